// The similar-cases panel: a page of the cbmir gateway, talking to its JSON API with fetch().
// No inline handlers, no external resources (the page's Content-Security-Policy allows none).
// Thumbnails are fetched with the Authorization header and shown through blob: URLs, because an
// <img src> cannot send the header.
"use strict";

(function () {
  const TOKEN_KEY = "cbmir.token";
  const $ = (id) => document.getElementById(id);
  const form = $("query");
  const tokenInput = $("token");
  const fileInput = $("file");
  const drop = $("drop");
  const dropLabel = $("drop-label");
  const uidInput = $("uid");
  const pictureModality = $("picture-modality");
  const imageModality = $("image-modality");
  const modalityBoxes = $("modalities");
  const groupStudy = $("group-study");
  const excludePatient = $("exclude-patient");
  const kInput = $("k");
  const searchButton = $("search");
  const moreButton = $("more");
  const statusLine = $("status");
  const errorBox = $("error");
  const results = $("results");
  const cardTemplate = $("card");

  let chosenFile = null;
  let blobUrls = [];
  let lastQuery = null;
  let nextOffset = null;

  // --- token: this tab only ------------------------------------------------------------------------
  tokenInput.value = sessionStorage.getItem(TOKEN_KEY) || "";
  tokenInput.addEventListener("input", () => {
    const value = tokenInput.value.trim();
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    else sessionStorage.removeItem(TOKEN_KEY);
  });

  function authHeaders() {
    const token = tokenInput.value.trim();
    return token ? { Authorization: "Bearer " + token } : {};
  }

  // --- the vocabulary: the API's own document names the modalities -------------------------------
  async function loadVocabulary() {
    let names = [];
    try {
      const response = await fetch("openapi.json");
      const doc = await response.json();
      const schema = doc.paths["/v1/search"].post.requestBody.content["application/json"].schema;
      names = schema.properties.modalities.items.enum;
    } catch (err) {
      showError("Could not read the API description (openapi.json): " + err.message);
      return;
    }
    const blank = document.createElement("option");
    blank.value = "";
    blank.textContent = "choose a modality";
    imageModality.append(blank);
    for (const name of names) {
      const option = document.createElement("option");
      option.value = name;
      option.textContent = name;
      imageModality.append(option);
      const label = document.createElement("label");
      const box = document.createElement("input");
      box.type = "checkbox";
      box.value = name;
      box.name = "modalities";
      label.append(box, " " + name);
      modalityBoxes.append(label);
    }
  }

  // --- the query file ------------------------------------------------------------------------------
  function isPicture(file) {
    return /^image\/(png|jpeg)$/.test(file.type) || /\.(png|jpe?g)$/i.test(file.name);
  }

  function choose(file) {
    chosenFile = file || null;
    drop.classList.toggle("chosen", Boolean(chosenFile));
    dropLabel.textContent = chosenFile ? chosenFile.name : "Drop a file here, or choose one";
    pictureModality.hidden = !(chosenFile && isPicture(chosenFile));
    if (chosenFile) uidInput.value = "";
  }

  fileInput.addEventListener("change", () => choose(fileInput.files[0]));
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    if (event.dataTransfer.files.length) choose(event.dataTransfer.files[0]);
  });
  drop.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      fileInput.click();
    }
  });
  uidInput.addEventListener("input", () => {
    if (uidInput.value.trim() && chosenFile) {
      fileInput.value = "";
      choose(null);
    }
  });

  // --- messages ------------------------------------------------------------------------------------
  function showError(text) {
    errorBox.textContent = text;
    errorBox.hidden = false;
  }

  function clearError() {
    errorBox.hidden = true;
    errorBox.textContent = "";
  }

  const HINTS = {
    401: "The API token is missing or not valid.",
    403: "This API token may not do this.",
    404: "Not found.",
    413: "The file is too large.",
    415: "This file is not DICOM, PNG or JPEG.",
    429: "The service is busy; try again in a moment.",
    501: "The query service does not offer this yet.",
    503: "The query service is unavailable; try again later.",
  };

  async function apiError(response) {
    let message = "";
    try {
      const body = await response.json();
      if (body && body.error) message = body.error.message + " (" + body.error.code + ")";
    } catch (err) {
      message = "";
    }
    const hint = HINTS[response.status] || "The request failed.";
    return hint + (message ? " " + message : " HTTP " + response.status);
  }

  // --- searching -----------------------------------------------------------------------------------
  function checkedModalities() {
    return Array.from(modalityBoxes.querySelectorAll("input:checked")).map((box) => box.value);
  }

  function buildQuery() {
    const k = Math.max(1, Math.min(100, parseInt(kInput.value, 10) || 12));
    const common = {
      k: k,
      modalities: checkedModalities(),
      group_by: groupStudy.checked ? "study" : "instance",
      exclude_same_patient: excludePatient.checked,
    };
    if (chosenFile) {
      if (isPicture(chosenFile) && !imageModality.value) {
        throw new Error("Choose the modality this picture shows.");
      }
      return { file: chosenFile, picture: isPicture(chosenFile), modality: imageModality.value, common };
    }
    const uid = uidInput.value.trim();
    if (!uid) throw new Error("Drop a file or paste a SOP Instance UID first.");
    return { uid, common };
  }

  function requestFor(query, offset) {
    const fields = Object.assign({}, query.common, { offset: offset });
    if (query.file) {
      const body = new FormData();
      body.append("file", query.file, query.file.name);
      for (const [name, value] of Object.entries(fields)) {
        if (name === "modalities") value.forEach((m) => body.append("modalities", m));
        else body.append(name, String(value));
      }
      if (query.picture) body.append("modality", query.modality);
      return { method: "POST", headers: authHeaders(), body };
    }
    const json = Object.assign({ sop_instance_uid: query.uid }, fields);
    return {
      method: "POST",
      headers: Object.assign({ "Content-Type": "application/json" }, authHeaders()),
      body: JSON.stringify(json),
    };
  }

  async function run(query, offset) {
    clearError();
    searchButton.disabled = moreButton.disabled = true;
    statusLine.textContent = "Searching…";
    try {
      const response = await fetch("v1/search", requestFor(query, offset));
      if (!response.ok) {
        statusLine.textContent = "";
        // a failed new search must not leave the last query's cases on screen, as if they were its
        if (offset === 0) {
          resetResults();
          moreButton.hidden = true;
        }
        showError(await apiError(response));
        return;
      }
      const answer = await response.json();
      if (offset === 0) resetResults();
      answer.hits.forEach((hit) => results.append(card(hit, query.common.group_by === "study")));
      nextOffset = answer.next_offset;
      moreButton.hidden = !nextOffset;
      const count = results.querySelectorAll(".card").length;
      statusLine.textContent = count
        ? count + (query.common.group_by === "study" ? " studies" : " similar images") +
          (answer.excluded_self ? " (the query itself left out)" : "") +
          (answer.searched_modalities.length ? "; compared with " + answer.searched_modalities.join(", ") : "") +
          "; model " + answer.model_version
        : "No similar cases found.";
    } catch (err) {
      statusLine.textContent = "";
      showError("The gateway could not be reached: " + err.message);
    } finally {
      searchButton.disabled = moreButton.disabled = false;
    }
  }

  function resetResults() {
    blobUrls.forEach((url) => URL.revokeObjectURL(url));
    blobUrls = [];
    results.replaceChildren();
  }

  function card(hit, grouped) {
    const node = cardTemplate.content.firstElementChild.cloneNode(true);
    node.dataset.sopInstanceUid = hit.sop_instance_uid;
    node.querySelector(".modality").textContent =
      (hit.modality || "unknown") + (hit.modality_code ? " · " + hit.modality_code : "");
    const finding = node.querySelector(".finding");
    finding.textContent = hit.finding || "no finding";
    finding.classList.toggle("none", !hit.finding);
    node.querySelector(".distance").textContent = Number(hit.distance).toFixed(4);
    node.querySelector(".study-date").textContent = hit.study_date || "unknown";
    if (grouped) {
      const matching = node.querySelector(".matching");
      const n = hit.matching_instances || 1;
      matching.textContent = n + (n === 1 ? " matching image" : " matching images");
      matching.hidden = false;
    }
    node.querySelector(".uid").textContent = hit.sop_instance_uid;
    loadThumbnail(hit, node.querySelector(".thumb img"), node.querySelector(".no-thumb"));
    return node;
  }

  async function loadThumbnail(hit, img, placeholder) {
    const noThumbnail = () => {
      img.hidden = true;
      placeholder.hidden = false;
    };
    if (!hit.rendered) return noThumbnail();
    try {
      // relative to this page, so that a gateway served under a proxy path (/cbmir/) is asked, not the
      // proxy's root
      const response = await fetch(hit.rendered.replace(/^\/+/, "") + "?size=256", {
        headers: Object.assign({ Accept: "image/png" }, authHeaders()),
      });
      if (!response.ok) return noThumbnail();
      const url = URL.createObjectURL(await response.blob());
      blobUrls.push(url);
      img.src = url;
    } catch (err) {
      noThumbnail();
    }
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    let query;
    try {
      query = buildQuery();
    } catch (err) {
      showError(err.message);
      return;
    }
    lastQuery = query;
    run(query, 0);
  });

  moreButton.addEventListener("click", () => {
    if (lastQuery && nextOffset) run(lastQuery, nextOffset);
  });

  $("clear").addEventListener("click", () => {
    fileInput.value = "";
    choose(null);
    uidInput.value = "";
    clearError();
    resetResults();
    statusLine.textContent = "";
    moreButton.hidden = true;
  });

  loadVocabulary();
})();
