// cbmir-dcmtk-scp: the network side of `cbmir scp` on dcmtk (CBMIR_DICOM_RECEIVER=dcmtk).
//
// The Python listener (services/dicom/dcmtk_scp.py) binds the port, starts this program with the
// listening socket as a file descriptor, writes the presentation contexts to its stdin ("ts UID" and
// "sop UID" lines, then "end"), and reads one line per event from its stdout. For each
// C-STORE this program does what the Python handler does, in the same order:
//
//   receive the data set into spool/tmp (bit-preserving, with a File Meta)
//   -> parse it with dcmtk and compare its UIDs with the request
//   -> fsync the file, rename it into spool/incoming under its name, fsync the folder
//   -> tell the listener ("stored NAME BYTES MICROSECONDS"), which sends the workers a reference
//   -> answer the sender.
//
// A refused object is answered with its status and, when it is malformed, left in spool/tmp for the
// listener to quarantine ("refused STATUS REASON TMPFILE NAME DETAIL"); the answer waits until the
// listener says "kept TMPFILE" on stdin, so what is refused is in quarantine before the sender hears
// of it. Nothing is acknowledged before it is durable. Lines carry UIDs, statuses and reasons, never
// a patient's data.
//
// Each connection has its own thread. dcmtk reads an association request from the socket in the
// global dcmExternalSocketHandle (the only public way to give it a socket it did not accept); the
// thread waits until the whole A-ASSOCIATE-RQ PDU is buffered, then hands the socket over under a
// lock, so a client that connects and says nothing holds only its own thread.

#include "dcmtk/config/osconfig.h"
#include "dcmtk/dcmdata/dcdeftag.h"
#include "dcmtk/dcmdata/dcfilefo.h"
#include "dcmtk/dcmdata/dcxfer.h"
#include "dcmtk/dcmnet/dimse.h"
#include "dcmtk/dcmnet/dul.h"
#include "dcmtk/dcmnet/scpthrd.h"
#include "dcmtk/oflog/oflog.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/sha.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <mutex>
#include <set>
#include <system_error>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {

// DICOM statuses (PS3.4 Annex B), as the Python listener answers them.
constexpr Uint16 kSuccess = 0x0000;
constexpr Uint16 kOutOfResources = 0xA700;
constexpr Uint16 kDatasetMismatch = 0xA900;
constexpr Uint16 kCannotUnderstand = 0xC210;
// The largest A-ASSOCIATE-RQ PDU waited for (a request proposing 128 contexts is ~20 KB).
constexpr size_t kMaxAssociateRequest = 64 * 1024;
// Connections still waiting for their association request, at most: more are closed at once (each
// waits at most the ACSE timeout, so a flood of silent connections holds no association slot).
constexpr int kMaxWaiting = 128;
// Values up to this size are read when a received file is checked; larger ones (pixel data) are
// skipped, which still finds a value that runs past the end of the file.
constexpr Uint32 kCheckReadLength = 64 * 1024;
// Data sets in these syntaxes are deflated as a whole: not offered, since checking one would
// inflate it without a budget (pynetdicom's side inflates within one).
const std::set<std::string> kNotOffered = {"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95"};

struct Options {
    int listen_fd = -1;
    std::string ae_title;
    std::string spool_tmp;
    std::string incoming;
    Uint32 max_pdu = 65536;
    int acse_timeout_s = 30;
    int idle_timeout_s = 30;
    int max_associations = 32;
    long parent_pid = 0;
    unsigned long long min_free_bytes = 0;
    std::set<std::string> allowed_calling;
};

Options g_options;
std::mutex g_emit_lock;
std::mutex g_handover_lock;  // guards dcmExternalSocketHandle
std::atomic<int> g_active{0};   // associations being served
std::atomic<int> g_waiting{0};  // connections waiting for their association request
std::atomic<unsigned long> g_file_number{0};
// Refused files the listener has quarantined ("kept NAME" on stdin), and the answers waiting for them.
std::mutex g_kept_lock;
std::condition_variable g_kept_changed;
std::set<std::string> g_awaited;  // refused files whose answers wait
std::set<std::string> g_kept;     // of those, the ones the listener confirmed
constexpr int kKeptWaitS = 10;
T_ASC_Network* g_network = nullptr;

// One line to the listener; a broken pipe (the listener is gone) ends this process.
void emit(const std::string& line) {
    std::lock_guard<std::mutex> guard(g_emit_lock);
    std::string out = line + "\n";
    if (std::fwrite(out.data(), 1, out.size(), stdout) != out.size() || std::fflush(stdout) != 0) {
        _exit(3);
    }
}

// Without leading and trailing whitespace (as Python's str.strip() for ASCII).
std::string trimmed(const char* text) {
    static const char* space = " \t\n\r\v\f";
    std::string value(text ? text : "");
    const auto first = value.find_first_not_of(space);
    if (first == std::string::npos) return "";
    return value.substr(first, value.find_last_not_of(space) - first + 1);
}

// services.core.vocabulary.is_valid_uid: digits and dots (no empty component), at most 64.
bool is_valid_uid(const std::string& uid) {
    if (uid.empty() || uid.size() > 64) return false;
    size_t start = 0;
    while (true) {
        size_t end = uid.find('.', start);
        std::string part = uid.substr(start, end == std::string::npos ? std::string::npos : end - start);
        if (part.empty()) return false;
        for (char c : part)
            if (c < '0' || c > '9') return false;
        if (end == std::string::npos) return true;
        start = end + 1;
    }
}

// services.ingest.spool.spool_name_for: the UID when valid, else "x" + 40 hex digits of its SHA-256.
std::string spool_name_for(const std::string& uid) {
    if (is_valid_uid(uid)) return uid + ".dcm";
    unsigned char digest[SHA256_DIGEST_LENGTH];
    SHA256(reinterpret_cast<const unsigned char*>(uid.data()), uid.size(), digest);
    static const char* hex = "0123456789abcdef";
    std::string name = "x";
    for (int i = 0; i < 20; ++i) {
        name += hex[digest[i] >> 4];
        name += hex[digest[i] & 15];
    }
    return name + ".dcm";
}

// Text from the network or from dcmtk, made safe for one event line: printable ASCII only.
std::string one_line(std::string text) {
    for (char& c : text)
        if (c < 0x20 || c > 0x7E) c = '?';
    return text;
}

bool fsync_path(const std::string& path, int flags) {
    int fd = ::open(path.c_str(), flags);
    if (fd < 0) return false;
    bool ok = ::fsync(fd) == 0;
    ::close(fd);
    return ok;
}

unsigned long long free_bytes() {
    struct statvfs stats;
    if (::statvfs(g_options.spool_tmp.c_str(), &stats) != 0) return 0;
    return static_cast<unsigned long long>(stats.f_bavail) * stats.f_frsize;
}

bool has_room() { return g_options.min_free_bytes == 0 || free_bytes() >= g_options.min_free_bytes; }

// Where the File Meta Information that dcmtk wrote ends: preamble, "DICM", the (0002,0000) group
// length element (12 bytes, explicit VR little endian) and the group it counts; 0 if unreadable.
unsigned long long file_meta_end(const std::string& path) {
    unsigned char head[144];
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    const ssize_t got = ::read(fd, head, sizeof head);
    ::close(fd);
    if (got != static_cast<ssize_t>(sizeof head) || std::memcmp(head + 128, "DICM", 4) != 0 ||
        std::memcmp(head + 132, "\x02\x00\x00\x00UL\x04\x00", 8) != 0)
        return 0;
    const unsigned long long group = head[140] | (head[141] << 8) | (head[142] << 16) | (static_cast<unsigned long long>(head[143]) << 24);
    return sizeof head + group;
}

struct Verdict {
    Uint16 status = kSuccess;
    std::string reason;
    std::string detail;
};

// The listener's parse check: dcmtk parses every element of the file (values over
// kCheckReadLength are skipped, not read; one that runs past the end is an error), the data set
// names its SOP Instance and Class UIDs, and they are the request's.
Verdict check_dataset(const std::string& path, const std::string& instance_uid, const std::string& class_uid) {
    DcmFileFormat file;
    OFCondition cond = file.loadFile(path.c_str(), EXS_Unknown, EGL_noChange, kCheckReadLength, ERM_fileOnly);
    if (cond.bad()) return {kCannotUnderstand, "parse-error", std::string("dataset cannot be parsed: ") + cond.text()};
    DcmDataset* dataset = file.getDataset();
    OFString instance, sop_class;
    if (dataset->findAndGetOFString(DCM_SOPInstanceUID, instance).bad() || instance.empty() ||
        dataset->findAndGetOFString(DCM_SOPClassUID, sop_class).bad() || sop_class.empty()) {
        return {kCannotUnderstand, "missing-uid", "the dataset has no SOP Instance UID or SOP Class UID"};
    }
    if (trimmed(instance.c_str()) != instance_uid)
        return {kDatasetMismatch, "dataset-mismatch", "SOP Instance UID in the dataset differs from the C-STORE request"};
    if (trimmed(sop_class.c_str()) != class_uid)
        return {kDatasetMismatch, "dataset-mismatch", "SOP Class UID in the dataset differs from the C-STORE request"};
    return {};
}

// Wait (bounded) until the listener reports the refused file ``path`` (a name in spool/tmp) quarantined.
void wait_until_kept(const std::string& path) {
    std::unique_lock<std::mutex> lock(g_kept_lock);
    g_awaited.insert(path);
    const bool kept = g_kept_changed.wait_for(lock, std::chrono::seconds(kKeptWaitS), [&] { return g_kept.count(path) > 0; });
    g_kept.erase(path);
    g_awaited.erase(path);
    if (!kept) std::fprintf(stderr, "cbmir-dcmtk-scp: the listener did not confirm keeping a refused file in %d s\n", kKeptWaitS);
}

// The listener's confirmations, one "kept NAME" line each, until it closes stdin.
void read_confirmations() {
    std::string line;
    while (std::getline(std::cin, line)) {
        if (line.rfind("kept ", 0) != 0) continue;
        {
            std::lock_guard<std::mutex> guard(g_kept_lock);
            if (g_awaited.count(line.substr(5))) g_kept.insert(line.substr(5));  // late ones are dropped
        }
        g_kept_changed.notify_all();
    }
}

class StoreSCP : public DcmThreadSCP {
  public:
    explicit StoreSCP(std::string peer) : peer_(std::move(peer)) {}

  protected:
    OFCondition processAssociationRQ() override {
        if (g_active.load() > g_options.max_associations) {  // this one included
            emit("association rejected " + peer_ + " too-many " + calling());
            refuseAssociation(DCMSCP_TOO_MANY_ASSOCIATIONS);
            return EC_Normal;
        }
        return DcmThreadSCP::processAssociationRQ();
    }

    OFBool checkCallingAETitleAccepted(const OFString& calling_ae) override {
        if (g_options.allowed_calling.empty()) return OFTrue;
        if (g_options.allowed_calling.count(trimmed(calling_ae.c_str()))) return OFTrue;
        emit("association rejected " + peer_ + " calling-ae " + calling());
        return OFFalse;
    }

    void notifyAssociationAcknowledge() override { emit("association accepted " + peer_ + " - " + calling()); }

    void notifyAbortRequest() override { emit("association aborted " + peer_ + " peer " + calling()); }

    // handleAssociation() aborts the association after this: idle past the timeout, or broken.
    void notifyDIMSEError(const OFCondition& cond) override {
        const bool idle = cond == DIMSE_NODATAAVAILABLE;
        emit("association aborted " + peer_ + (idle ? " idle " : " error ") + calling());
    }

    OFCondition handleIncomingCommand(T_DIMSE_Message* message, const DcmPresentationContextInfo& context) override {
        if (message->CommandField == DIMSE_C_STORE_RQ)
            return handle_store(message->msg.CStoreRQ, context.presentationContextID);
        return DcmThreadSCP::handleIncomingCommand(message, context);
    }

  private:
    // Receive the data set into memory, drop it and answer 0xA700 (the sender keeps the object).
    OFCondition refuse_unread(T_DIMSE_C_StoreRQ& request, T_ASC_PresentationContextID context_id, const std::string& why) {
        OFCondition cond = receiveSTORERequest(request, context_id, OFString("/dev/null"));  // never in memory
        if (cond.bad()) return cond;
        emit("refused A700 " + why.substr(0, why.find(' ')) + " - " + why.substr(why.find(' ') + 1));
        return sendSTOREResponse(context_id, request, kOutOfResources);
    }

    std::string calling() {
        const std::string title = one_line(trimmed(getPeerAETitle().c_str()));
        return title.empty() ? "-" : title;
    }

    // dcmtk reports the data set bytes received so far after each fragment.
    void notifyRECEIVEProgress(const unsigned long byte_count) override { received_bytes_ = byte_count; }

    OFCondition handle_store(T_DIMSE_C_StoreRQ& request, T_ASC_PresentationContextID context_id) {
        const std::string instance_uid = trimmed(request.AffectedSOPInstanceUID);
        const std::string class_uid = trimmed(request.AffectedSOPClassUID);
        const auto started = std::chrono::steady_clock::now();
        const std::string name = spool_name_for(instance_uid);
        if (!has_room())
            return refuse_unread(request, context_id, "disk-full " + name + " the data volume is below its free space watermark");
        std::ostringstream tmp_name;
        tmp_name << g_options.spool_tmp << "/dcmtk-" << ::getpid() << "-" << g_file_number++ << ".part";
        const std::string tmp = tmp_name.str();
        // dcmtk cannot go on with an association whose data set it failed to open a file for: make
        // sure the file can be created first (dcmtk then writes into it), else drop the data set.
        const int probe = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
        if (probe < 0)
            return refuse_unread(request, context_id,
                                 "storage " + name + " the dataset could not be written into spool/tmp: " + std::strerror(errno));
        ::close(probe);
        received_bytes_ = 0;
        OFCondition cond = receiveSTORERequest(request, context_id, OFString(tmp.c_str()));
        if (cond.bad() && cond.module() == OFM_dcmnet && cond.code() == DIMSEC_OUTOFRESOURCES) {
            // a write failed (a full disk): dcmtk has read and dropped the rest of the data set
            ::unlink(tmp.c_str());
            emit("refused A700 storage - " + name + " the dataset could not be written into spool/tmp");
            return sendSTOREResponse(context_id, request, kOutOfResources);
        }
        if (cond.bad()) {  // the connection failed mid-object: nothing was acknowledged
            ::unlink(tmp.c_str());
            return cond;
        }
        struct stat info {};
        if (::stat(tmp.c_str(), &info) != 0) {
            emit("refused A700 storage - " + name + " the dataset could not be written into spool/tmp");
            return sendSTOREResponse(context_id, request, kOutOfResources);
        }
        // dcmtk does not check its last buffered write (a disk that filled just then): the file must
        // hold every byte read off the wire before it is checked, else it is a storage failure
        const auto expected = file_meta_end(tmp) + received_bytes_;
        if (static_cast<unsigned long long>(info.st_size) != expected) {
            ::unlink(tmp.c_str());
            emit("refused A700 storage - " + name + " the received file is incomplete (" + std::to_string(info.st_size) +
                 " of " + std::to_string(expected) + " bytes)");
            return sendSTOREResponse(context_id, request, kOutOfResources);
        }
        Verdict verdict = check_dataset(tmp, instance_uid, class_uid);
        if (verdict.status != kSuccess) {
            char status[8];
            std::snprintf(status, sizeof status, "%04X", verdict.status);
            const std::string kept = tmp.substr(tmp.rfind('/') + 1);  // in spool/tmp
            emit(std::string("refused ") + status + " " + verdict.reason + " " + kept + " " + name + " " + one_line(verdict.detail));
            wait_until_kept(kept);
            return sendSTOREResponse(context_id, request, verdict.status);
        }
        const std::string final_path = g_options.incoming + "/" + name;
        if (!fsync_path(tmp, O_RDONLY) || ::rename(tmp.c_str(), final_path.c_str()) != 0 ||
            !fsync_path(g_options.incoming, O_RDONLY | O_DIRECTORY)) {
            std::string why = std::strerror(errno);
            ::unlink(tmp.c_str());
            emit("refused A700 storage - " + name + " cannot spool into spool/incoming: " + why);
            return sendSTOREResponse(context_id, request, kOutOfResources);
        }
        const auto micros =
            std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - started).count();
        emit("stored " + name + " " + std::to_string(info.st_size) + " " + std::to_string(micros));
        return sendSTOREResponse(context_id, request, kSuccess);
    }

    std::string peer_;
    unsigned long received_bytes_ = 0;
};

// Wait until the connection's first PDU (the A-ASSOCIATE-RQ) is wholly in the socket buffer; false
// when the peer closes, announces an oversized request, or has not sent it all within the ACSE timeout.
bool associate_request_buffered(int fd) {
    using clock = std::chrono::steady_clock;
    const auto deadline = clock::now() + std::chrono::seconds(g_options.acse_timeout_s);
    constexpr size_t kHeader = 6;  // PDU type, reserved, 4-byte length
    size_t want = kHeader;
    unsigned char header[kHeader];
    bool buffered = false;
    while (!buffered) {
        // poll() says readable only once `want` bytes are buffered (SO_RCVLOWAT): no busy waiting
        const int low_water = static_cast<int>(want);
        ::setsockopt(fd, SOL_SOCKET, SO_RCVLOWAT, &low_water, sizeof low_water);
        const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - clock::now()).count();
        if (left <= 0) return false;
        struct pollfd waiting = {fd, POLLIN, 0};
        const int ready = ::poll(&waiting, 1, static_cast<int>(left));
        if (ready < 0 && errno == EINTR) continue;
        if (ready <= 0 || (waiting.revents & (POLLERR | POLLHUP | POLLNVAL))) return false;
        if (want == kHeader) {
            const ssize_t got = ::recv(fd, header, kHeader, MSG_PEEK | MSG_DONTWAIT);
            if (got == 0) return false;  // closed
            if (got < static_cast<ssize_t>(kHeader)) continue;
            if (header[0] != 0x01) break;  // not a request: dcmtk answers it
            const size_t length = (static_cast<size_t>(header[2]) << 24) | (static_cast<size_t>(header[3]) << 16) |
                                  (static_cast<size_t>(header[4]) << 8) | header[5];
            if (length > kMaxAssociateRequest) return false;
            want = kHeader + length;
        } else {
            buffered = true;
        }
    }
    const int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_RCVLOWAT, &one, sizeof one);
    return true;
}

void serve_connection(int fd, std::string peer, DcmSharedSCPConfig config) {
    T_ASC_Association* assoc = nullptr;
    OFCondition cond = EC_IllegalCall;
    const bool requested = associate_request_buffered(fd);
    g_waiting--;
    if (requested) {
        std::lock_guard<std::mutex> guard(g_handover_lock);
        dcmExternalSocketHandle.set(fd);
        cond = ASC_receiveAssociation(g_network, &assoc, g_options.max_pdu, nullptr, nullptr, OFFalse, DUL_NOBLOCK,
                                      g_options.acse_timeout_s);
        dcmExternalSocketHandle.set(-1);
    }
    if (cond.good()) {
        g_active++;
        StoreSCP scp(peer);
        scp.setSharedConfig(config);
        scp.run(assoc);  // the SCP drops and destroys the association when it is done
        g_active--;
        return;
    }
    // dcmtk owns (and closes) the socket only once it made a connection of it
    const bool ours = assoc == nullptr || assoc->DULassociation == nullptr;
    if (assoc != nullptr) {
        ASC_dropAssociation(assoc);
        ASC_destroyAssociation(&assoc);
    }
    if (ours) ::close(fd);
    emit("association rejected " + peer + " no-request -");
}

bool load_contexts(DcmSCPConfig& config) {
    OFList<OFString> syntaxes;
    std::vector<std::string> classes;
    std::string kind, uid;
    while (std::cin >> kind) {
        if (kind == "end") break;
        if (!(std::cin >> uid)) return false;
        if (kind == "ts") {
            // only the syntaxes dcmtk can parse: an object it cannot read back is refused anyway
            if (DcmXfer(uid.c_str()).getXfer() != EXS_Unknown && !kNotOffered.count(uid)) syntaxes.push_back(uid.c_str());
        } else if (kind == "sop") {
            classes.push_back(uid);
        }
    }
    if (syntaxes.empty() || classes.empty()) return false;
    for (const auto& sop_class : classes) {
        if (config.addPresentationContext(sop_class.c_str(), syntaxes).bad()) return false;
    }
    return true;
}

int usage(const char* why) {
    std::fprintf(stderr, "cbmir-dcmtk-scp: %s\n", why);
    return 2;
}

}  // namespace

int main(int argc, char** argv) {
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);  // the listener that started this program is gone: stop
    ::signal(SIGPIPE, SIG_IGN);
    for (int i = 1; i + 1 < argc; i += 2) {
        const std::string key = argv[i], value = argv[i + 1];
        if (key == "--listen-fd") g_options.listen_fd = std::atoi(value.c_str());
        else if (key == "--ae-title") g_options.ae_title = value;
        else if (key == "--spool-tmp") g_options.spool_tmp = value;
        else if (key == "--incoming") g_options.incoming = value;
        else if (key == "--max-pdu") g_options.max_pdu = static_cast<Uint32>(std::strtoul(value.c_str(), nullptr, 10));
        else if (key == "--acse-timeout") g_options.acse_timeout_s = std::atoi(value.c_str());
        else if (key == "--idle-timeout") g_options.idle_timeout_s = std::atoi(value.c_str());
        else if (key == "--max-associations") g_options.max_associations = std::atoi(value.c_str());
        else if (key == "--min-free-mb") g_options.min_free_bytes = std::strtoull(value.c_str(), nullptr, 10) << 20;
        else if (key == "--allow") g_options.allowed_calling.insert(value);
        else if (key == "--parent-pid") g_options.parent_pid = std::atol(value.c_str());
        else return usage(("unknown option " + key).c_str());
    }
    if (g_options.listen_fd < 0 || g_options.ae_title.empty() || g_options.spool_tmp.empty() ||
        g_options.incoming.empty())
        return usage("needs --listen-fd, --ae-title, --spool-tmp and --incoming");

    // The listener may have died before the death signal was armed: then stop now.
    if (g_options.parent_pid != 0 && ::getppid() != g_options.parent_pid) return 1;

    OFLog::configure(OFLogger::WARN_LOG_LEVEL);
    dcmDisableGethostbyaddr.set(OFTrue);

    DcmSCPConfig config;
    config.setAETitle(g_options.ae_title.c_str());
    config.setRespondWithCalledAETitle(OFFalse);
    config.setMaxReceivePDULength(g_options.max_pdu);
    config.setACSETimeout(static_cast<Uint32>(g_options.acse_timeout_s));
    config.setDIMSEBlockingMode(DIMSE_NONBLOCKING);
    config.setDIMSETimeout(static_cast<Uint32>(g_options.idle_timeout_s));
    config.setConnectionBlockingMode(DUL_NOBLOCK);
    config.setConnectionTimeout(static_cast<Uint32>(g_options.acse_timeout_s));
    if (!load_contexts(config)) return usage("no presentation contexts on stdin (\"ts UID\" and \"sop UID\" lines)");
    if (config.setAndCheckAssociationProfile("DEFAULT").bad()) return usage("the presentation contexts do not form a profile");
    DcmSharedSCPConfig shared(config);

    // An acceptor network with no listening socket of its own: the socket handed over is used.
    dcmExternalSocketHandle.set(g_options.listen_fd);
    OFCondition cond = ASC_initializeNetwork(NET_ACCEPTOR, 0, g_options.acse_timeout_s, &g_network);
    dcmExternalSocketHandle.set(-1);
    if (cond.bad()) return usage((std::string("cannot set up the network: ") + cond.text()).c_str());

    std::thread(read_confirmations).detach();
    emit("ready");
    while (true) {
        struct sockaddr_storage address {};
        socklen_t length = sizeof address;
        const int fd = ::accept4(g_options.listen_fd, reinterpret_cast<sockaddr*>(&address), &length, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EBADF || errno == EINVAL || errno == ENOTSOCK) {
                std::fprintf(stderr, "cbmir-dcmtk-scp: accept failed: %s\n", std::strerror(errno));
                return 1;
            }
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) ::usleep(100000);
            continue;  // the connection's own failure (EPROTO, ECONNABORTED, ...): go on
        }
        if (g_waiting.load() >= kMaxWaiting) {  // a flood of connections that have not asked yet
            ::close(fd);
            continue;
        }
        int one = 1;
        ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        char host[64] = "-";
        if (address.ss_family == AF_INET)
            inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(&address)->sin_addr, host, sizeof host);
        else if (address.ss_family == AF_INET6)
            inet_ntop(AF_INET6, &reinterpret_cast<sockaddr_in6*>(&address)->sin6_addr, host, sizeof host);
        g_waiting++;
        try {
            std::thread(serve_connection, fd, std::string(host), shared).detach();
        } catch (const std::system_error&) {  // no thread to be had: this connection is refused
            g_waiting--;
            ::close(fd);
        }
    }
}
