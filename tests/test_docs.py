"""The README's configuration table is the settings module's, and its two commands exist."""

from pathlib import Path

from services.core.config import ENVIRONMENT

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_setting_is_documented_with_its_default():
    for name, (default, _) in ENVIRONMENT.items():
        assert f"| `{name}` | {default} |" in README, name


def test_readme_gives_exactly_two_setup_commands():
    block = README.split("## Set up on a fresh machine", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["make demo", "make test"]
    makefile = (Path(__file__).resolve().parent.parent / "Makefile").read_text()
    assert "\ndemo:" in makefile and "\ntest:" in makefile


def test_conformance_lists_exactly_the_accepted_classes():
    from services.core.vocabulary import accepted_storage_classes

    doc = (Path(__file__).resolve().parent.parent / "docs" / "conformance.md").read_text()
    listed = set(__import__("re").findall(r"\| `(1\.2\.840\.10008\.5\.1\.4\.1\.1[0-9.]*)` \|", doc))
    assert listed == set(map(str, accepted_storage_classes().values()))


def test_no_stale_module_names_in_docs_and_deployment():
    """Every ``services/...py`` path and ``services.x.y`` name in the docs, the deployment files and
    the Dockerfile exists, so a moved module cannot leave a stale reference behind."""
    import importlib
    import re

    repo = Path(__file__).resolve().parent.parent
    files = [
        repo / "README.md",
        repo / "Dockerfile",
        repo / "models" / "README.md",
        repo / "benchmarks" / "README.md",
        *(repo / "docs").glob("*.md"),
        *[p for p in (repo / "deploy").rglob("*") if p.is_file()],
    ]
    stale = []
    for path in files:
        text = path.read_text()
        paths = re.findall(r"\bservices/[\w/]+\.py\b", text)
        stale += [f"{path.name}: {match}" for match in paths if not (repo / match).is_file()]
        for match in re.findall(r"\bservices(?:\.\w+)+", text):
            parts = match.split(".")
            for end in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
                try:
                    obj = importlib.import_module(".".join(parts[:end]))
                except ImportError:
                    continue
                for attribute in parts[end:]:
                    obj = getattr(obj, attribute, None)
                if obj is None:
                    stale.append(f"{path.name}: {match}")
                break
    assert not stale, stale
