#!/usr/bin/env python3
"""A small client of the mprefill service (standard library + protobuf).

Speaks the coordinator's wire protocol (proto/envelope.proto): 4-byte little-endian
length-prefixed protobuf Envelopes over TCP (or TLS 1.3: tls://HOST:PORT, --tls, --tls-ca as
`mprefill submit`), the hello exchange with the optional HMAC-SHA256 proof (over TLS bound to
the TLS exporter, as proto/wire.cc), then SubmitJob / Progress / JobResult, CancelJob and
StatusRequest.

The Python message classes are generated from proto/*.proto by protoc (3.21, matching
python3-protobuf 3.21): from $MPREFILL_PROTO_PY when set (e.g. build/proto/python, the
`mprefill_proto_python` target), else into a cache folder on first use.

Command line:
    python3 python/mprefill_client.py --coordinator 127.0.0.1:7070 \\
        --prompt-ids 1,450,4996 --decode 16 [--secret-file F] [--tls [--tls-ca F]] [--json]
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import hmac
import importlib
import json
import os
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time

PROTOCOL_VERSION = 1
TLS_SCHEME = "tls://"
TLS_EXPORTER_LABEL = b"EXPORTER-mprefill-hello"  # wire::kTlsExporterLabel
MAX_FRAME = 64 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTO_DIR = os.path.join(ROOT, "proto")
PROTO_FILES = ["common.proto", "client.proto", "worker.proto", "decoder.proto", "envelope.proto"]


def _load_messages():
    """Imports envelope_pb2 / common_pb2, generating them with protoc when needed."""
    folder = os.environ.get("MPREFILL_PROTO_PY")
    if not folder:
        # A cache keyed by the .proto contents: regenerated when they change.
        h = hashlib.sha256()
        for f in PROTO_FILES:
            with open(os.path.join(PROTO_DIR, f), "rb") as fh:
                h.update(fh.read())
        folder = os.path.join(tempfile.gettempdir(), "mprefill-proto-py-" + h.hexdigest()[:16])
        if not os.path.exists(os.path.join(folder, "envelope_pb2.py")):
            os.makedirs(folder, exist_ok=True)
            tmp = tempfile.mkdtemp(dir=folder)
            cmd = ["protoc", "-I", PROTO_DIR, "--python_out=" + tmp] + [
                os.path.join(PROTO_DIR, f) for f in PROTO_FILES]
            try:
                subprocess.run(cmd, check=True, capture_output=True, text=True)
            except FileNotFoundError:
                raise RuntimeError("protoc not found: install protobuf-compiler "
                                   "(launch/setup.sh) or set MPREFILL_PROTO_PY")
            except subprocess.CalledProcessError as e:
                raise RuntimeError("protoc failed: " + e.stderr.strip())
            for name in os.listdir(tmp):  # atomic per file: concurrent clients agree
                os.replace(os.path.join(tmp, name), os.path.join(folder, name))
            os.rmdir(tmp)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module("envelope_pb2"), importlib.import_module("common_pb2")


def _require_protobuf():
    """One clear line (exit 2) when this python3 has no protobuf runtime."""
    try:
        importlib.import_module("google.protobuf")
    except ModuleNotFoundError:
        sys.stderr.write("mprefill_client: error: this python3 has no protobuf module: install "
                         "python3-protobuf (Debian; launch/setup.sh does) or 'pip install "
                         "protobuf'\n")
        sys.exit(2)


_require_protobuf()
pb, common = _load_messages()

STATE_NAMES = {v: k for k, v in common.JobState.items()}
ERROR_NAMES = {v: k for k, v in common.ErrorCode.items()}


class ServiceError(Exception):
    """An Error message of the coordinator (code name, message, job id)."""

    def __init__(self, code: int, message: str, job_id: int = 0):
        self.code = ERROR_NAMES.get(code, str(code))
        self.message = message
        self.job_id = job_id
        super().__init__(f"{self.code}: {message}")


def _proof(secret: bytes, side: bytes, role: int, key_id: str, server_nonce: bytes,
           client_nonce: bytes, channel: bytes = b"") -> bytes:
    """wire::hello_proof / server_proof (proto/wire.cc): HMAC-SHA256 over a label and
    length-prefixed fields (role, key id, both nonces, channel binding: the TLS exporter
    value over TLS, empty on plain TCP)."""
    msg = b"mprefill hello: " + side + b" proof v1"
    for f in (struct.pack("<I", role), key_id.encode(), server_nonce, client_nonce, channel):
        msg += struct.pack("<I", len(f)) + f
    return hmac.new(secret, msg, hashlib.sha256).digest()


def _tls_exporter(sock: ssl.SSLSocket) -> bytes:
    """The TLS exporter value the hello proofs cover (RFC 5705/8446: label
    EXPORTER-mprefill-hello, no context, 32 bytes). Python's ssl module has no call for it,
    so it is read through the libssl this interpreter's _ssl module links (ctypes): the
    SSL* sits after PyObject_HEAD and the socket weakref in _ssl's PySSLSocket. The pointer
    is checked (its descriptor is this socket's, its version TLS 1.3) before use."""
    import _ssl
    why = "this python3's ssl module cannot give the TLS exporter the hello proof needs"
    try:
        lib = ctypes.CDLL(getattr(_ssl, "__file__", None))
        export = lib.SSL_export_keying_material
        get_fd, version = lib.SSL_get_fd, lib.SSL_version
    except (OSError, AttributeError) as e:
        raise RuntimeError(f"{why} ({e}); use the mprefill CLI") from None
    export.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p,
                       ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    get_fd.argtypes = version.argtypes = [ctypes.c_void_p]
    ptr_size = ctypes.sizeof(ctypes.c_void_p)
    ssl_ptr = ctypes.c_void_p.from_address(id(sock._sslobj) + 3 * ptr_size).value
    if not ssl_ptr or get_fd(ssl_ptr) != sock.fileno() or version(ssl_ptr) != 0x0304:
        raise RuntimeError(f"{why} (unknown _ssl layout); use the mprefill CLI")
    out = ctypes.create_string_buffer(32)
    if export(ssl_ptr, out, 32, TLS_EXPORTER_LABEL, len(TLS_EXPORTER_LABEL), None, 0, 0) != 1:
        raise RuntimeError(f"{why} (SSL_export_keying_material failed)")
    return out.raw


class Client:
    """One connection to the coordinator, as role CLIENT."""

    def __init__(self, host: str, port: int, secret: bytes | None = None,
                 timeout_s: float = 10.0, name: str = "mprefill-python", key_id: str = "",
                 tls: bool = False, ca_file: str | None = None):
        """secret: the shared secret, or with key_id this client's key (--client-keys).
        tls (or host "tls://HOST", or a ca_file): TLS 1.3 to a coordinator started with
        --tls-cert; ca_file verifies its certificate and name, without one the hello's
        server proof (bound to the TLS exporter) alone vouches for the server."""
        if host.startswith(TLS_SCHEME):
            host, tls = host[len(TLS_SCHEME):], True
        tls = tls or bool(ca_file)
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        channel = b""
        if tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            if ca_file:
                try:
                    ctx.load_verify_locations(ca_file)
                except (OSError, ssl.SSLError) as e:
                    raise RuntimeError(f"cannot load CA file {ca_file}: {e}") from None
            else:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            try:
                self.sock = ctx.wrap_socket(self.sock, server_hostname=host)
            except ssl.SSLCertVerificationError as e:
                raise RuntimeError(f"TLS with {host}:{port}: certificate not trusted: "
                                   f"{e.verify_message}") from None
            except (ssl.SSLError, ConnectionError) as e:
                raise RuntimeError(f"TLS with {host}:{port}: handshake failed (not a TLS "
                                   f"server?): {e}") from None
            channel = _tls_exporter(self.sock)
        try:
            hello = self.recv(timeout_s)
        except (TimeoutError, ConnectionError) as e:
            if tls:
                raise
            raise ConnectionError(f"{e} before its ServerHello (a TLS port? use "
                                  f"tls://HOST:PORT or --tls)") from None
        if hello.WhichOneof("msg") == "error":
            raise ServiceError(hello.error.code, hello.error.message)
        if hello.WhichOneof("msg") != "server_hello":
            raise RuntimeError("expected ServerHello, got " + str(hello.WhichOneof("msg")))
        sh = hello.server_hello
        if sh.version != PROTOCOL_VERSION:
            raise RuntimeError(f"server speaks protocol {sh.version}, this client {PROTOCOL_VERSION}")
        env = pb.Envelope(version=PROTOCOL_VERSION)
        env.client_hello.version = PROTOCOL_VERSION
        env.client_hello.role = common.CLIENT
        env.client_hello.name = name
        env.client_hello.client_nonce = os.urandom(32)
        env.client_hello.key_id = key_id
        if not sh.auth_required and secret:
            # A key is never shown to, nor a result trusted from, an unproven server.
            raise RuntimeError("the server does not ask for authentication but this client "
                               "holds a key: refusing it (an impostor, or a server started "
                               "without its key files)")
        if sh.auth_required:
            if not secret:
                raise RuntimeError("the coordinator requires a secret (--secret-file)")
            env.client_hello.proof = _proof(secret, b"client", common.CLIENT, key_id,
                                            sh.nonce, env.client_hello.client_nonce, channel)
        self.send(env)
        ack = self.recv(timeout_s)
        kind = ack.WhichOneof("msg")
        if kind == "error":
            raise ServiceError(ack.error.code, ack.error.message)
        if kind != "hello_accepted":
            raise RuntimeError("expected HelloAccepted, got " + str(kind))
        if sh.auth_required:
            want = _proof(secret, b"server", common.CLIENT, key_id, sh.nonce,
                          env.client_hello.client_nonce, channel)
            if not hmac.compare_digest(ack.hello_accepted.server_proof, want):
                raise RuntimeError("the server did not prove it holds the key: refusing it "
                                   "(an impostor?)")

    # ---- frames
    def send(self, env) -> None:
        if not env.version:
            env.version = PROTOCOL_VERSION
        body = env.SerializeToString()
        self.sock.sendall(struct.pack("<I", len(body)) + body)

    def recv(self, timeout_s: float):
        """One Envelope; raises TimeoutError after timeout_s, ConnectionError on close."""
        deadline = time.monotonic() + timeout_s
        while True:
            if len(self.buf) >= 4:
                (n,) = struct.unpack("<I", self.buf[:4])
                if n > MAX_FRAME:
                    raise ConnectionError(f"frame of {n} bytes exceeds {MAX_FRAME}")
                if len(self.buf) >= 4 + n:
                    env = pb.Envelope()
                    env.ParseFromString(self.buf[4:4 + n])
                    self.buf = self.buf[4 + n:]
                    if env.version != PROTOCOL_VERSION:
                        raise ConnectionError(f"protocol version {env.version}")
                    return env
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no message within {timeout_s:.1f} s")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(1 << 16)
            except socket.timeout:
                raise TimeoutError(f"no message within {timeout_s:.1f} s")
            if not chunk:
                raise ConnectionError("coordinator closed the connection")
            self.buf += chunk

    def close(self) -> None:
        self.sock.close()

    # ---- jobs
    def submit(self, token_ids=None, text: str | None = None, decode_tokens: int = 0,
               sparse: str = "dense", temperature: float = 0.0, top_p: float = 1.0,
               seed: int = 0, stop_ids=(), want_progress: bool = True, tag: str = "",
               timeout_s: float = 30.0, dense_below: int | None = None) -> int:
        """Submits a job; returns its id once accepted (raises ServiceError if refused).
        dense_below: prompts of fewer tokens run dense (None: the coordinator's default,
        32768; 0: never dense)."""
        env = pb.Envelope(version=PROTOCOL_VERSION)
        s = env.submit
        if token_ids is not None:
            s.token_ids.extend(int(t) for t in token_ids)
        if text is not None:
            s.text = text
        o = s.options
        o.sparse = sparse
        if dense_below is not None:
            o.dense_below = dense_below
        o.decode_tokens = decode_tokens
        o.sampling.temperature = temperature
        o.sampling.top_p = top_p
        o.sampling.seed = seed
        o.stop_ids.extend(stop_ids)
        o.want_progress = want_progress
        s.client_tag = tag
        self.send(env)
        deadline = time.monotonic() + timeout_s
        while True:
            r = self.recv(max(0.01, deadline - time.monotonic()))
            kind = r.WhichOneof("msg")
            if kind == "accepted":
                return r.accepted.job_id
            if kind == "error":
                raise ServiceError(r.error.code, r.error.message, r.error.job_id)

    def follow(self, job_id: int, on_progress=None, timeout_s: float = 3600.0) -> dict:
        """Waits for the job's result; on_progress(layer, n_layers, tokens_per_s, state)."""
        deadline = time.monotonic() + timeout_s
        while True:
            r = self.recv(max(0.01, deadline - time.monotonic()))
            kind = r.WhichOneof("msg")
            if kind == "progress" and r.progress.job_id == job_id:
                if on_progress:
                    p = r.progress
                    on_progress(p.layer, p.n_layers, p.tokens_per_s, STATE_NAMES.get(p.state))
            elif kind == "result" and r.result.job_id == job_id:
                res = r.result
                return {
                    "job_id": res.job_id,
                    "status": STATE_NAMES.get(res.state),
                    "prompt_tokens": res.prompt_tokens,
                    "first_token_id": res.first_token_id,
                    "generated_ids": list(res.generated_ids),
                    "text": res.text,
                    "stopped_by": res.stopped_by,
                    "ttft_ms": res.ttft_ms,
                    "prefill_ms": res.prefill_ms,
                    "decode_ms": res.decode_ms,
                    "queue_ms": res.queue_ms,
                    "kv_bytes_handed_off": res.kv_bytes_handed_off,
                    "handoff_ms": res.handoff_ms,
                    # (layer, head) pairs per pattern that ran, over the worker group
                    "heads_run": dict(zip(("dense", "a_shape", "vertical_slash",
                                           "block_sparse"), res.heads_run)),
                }
            elif kind == "error" and r.error.job_id in (0, job_id):
                raise ServiceError(r.error.code, r.error.message, r.error.job_id)

    def status(self, job_id: int = 0, timeout_s: float = 10.0) -> dict:
        env = pb.Envelope(version=PROTOCOL_VERSION)
        env.status_request.job_id = job_id
        self.send(env)
        deadline = time.monotonic() + timeout_s
        while True:
            r = self.recv(max(0.01, deadline - time.monotonic()))
            kind = r.WhichOneof("msg")
            if kind == "status_reply":
                sr = r.status_reply
                return {
                    "jobs": [{"job_id": j.job_id, "status": STATE_NAMES.get(j.state),
                              "layer": j.layer, "n_layers": j.n_layers,
                              "prompt_tokens": j.prompt_tokens, "error": j.error}
                             for j in sr.jobs],
                    "groups": [{"name": g.name, "tp": g.tp, "sp": g.sp, "busy": g.busy}
                               for g in sr.groups],
                    "decoders": [{"name": d.name, "endpoint": d.endpoint,
                                  "active_jobs": d.active_jobs} for d in sr.decoders],
                }
            if kind == "error":
                raise ServiceError(r.error.code, r.error.message, r.error.job_id)

    def cancel(self, job_id: int, timeout_s: float = 10.0) -> str:
        """Cancels a job; returns its state afterwards (e.g. "CANCELLED")."""
        env = pb.Envelope(version=PROTOCOL_VERSION)
        env.cancel.job_id = job_id
        self.send(env)
        deadline = time.monotonic() + timeout_s
        while True:
            r = self.recv(max(0.01, deadline - time.monotonic()))
            kind = r.WhichOneof("msg")
            if kind == "status_reply" and r.status_reply.jobs:
                return STATE_NAMES.get(r.status_reply.jobs[0].state)
            if kind == "error" and r.error.code != common.CANCELLED_BY_CLIENT:
                raise ServiceError(r.error.code, r.error.message, r.error.job_id)


def _parse_hostport(text: str):
    """HOST:PORT or tls://HOST:PORT -> (host, port, tls)."""
    rest = text[len(TLS_SCHEME):] if text.startswith(TLS_SCHEME) else text
    host, sep, port = rest.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT or tls://HOST:PORT, got '{text}'")
    return host, int(port), rest != text


def main(argv=None) -> int:
    # No abbreviations: "--prompt" must never be read as "--prompt-ids".
    ap = argparse.ArgumentParser(description="Submit a job to an mprefill coordinator and follow it.",
                                 allow_abbrev=False)
    ap.add_argument("--coordinator", required=True, type=_parse_hostport,
                    help="HOST:PORT (tls://HOST:PORT: TLS)")
    ap.add_argument("--secret-file", help="shared secret of the service")
    ap.add_argument("--key-file", help='this client\'s key: one line "NAME SECRET"')
    ap.add_argument("--tls", action="store_true",
                    help="TLS 1.3 to the coordinator (its --tls-cert); the hello proof covers "
                         "the TLS exporter")
    ap.add_argument("--tls-ca", help="verify the coordinator's certificate against the PEM "
                                     "CAs in this file (implies --tls)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt-ids", help="comma-separated token ids")
    src.add_argument("--prompt", "--text", dest="text",
                     help="text prompt (needs the coordinator's --tokenizer); as `mprefill submit`")
    ap.add_argument("--decode", type=int, default=0, help="tokens decoded after the first one")
    ap.add_argument("--sparse", default="dense")
    ap.add_argument("--dense-below", type=int, default=None,
                    help="prompts of fewer tokens run dense (default: the coordinator's, 32768)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout-s", type=float, default=3600.0)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    a = ap.parse_args(argv)
    secret, key_id = None, ""
    try:
        if a.secret_file:
            with open(a.secret_file, "rb") as f:
                secret = f.read().rstrip(b" \t\r\n")
        elif a.key_file:
            with open(a.key_file, "rb") as f:
                fields = f.read().split()
            if len(fields) != 2:
                raise ValueError(f'key file {a.key_file}: expected one line "NAME SECRET"')
            key_id, secret = fields[0].decode(), fields[1]
    except (OSError, ValueError) as e:
        print(f"mprefill_client: error: {e}", file=sys.stderr)
        return 2
    ids = None
    if a.prompt_ids is not None:
        try:
            ids = [int(x) for x in a.prompt_ids.split(",") if x.strip()]
        except ValueError:
            print("mprefill_client: error: --prompt-ids expects integers", file=sys.stderr)
            return 2
    tty = sys.stderr.isatty() and not a.json
    try:
        host, port, tls = a.coordinator
        c = Client(host, port, secret=secret, key_id=key_id, tls=tls or a.tls, ca_file=a.tls_ca)
        job = c.submit(token_ids=ids, text=a.text, decode_tokens=a.decode, sparse=a.sparse,
                       temperature=a.temperature, top_p=a.top_p, seed=a.seed, want_progress=tty,
                       dense_below=a.dense_below)

        def bar(layer, n, tps, state):
            print(f"\rjob {job} {state} layer {layer}/{n} {tps:.0f} tok/s ", end="",
                  file=sys.stderr, flush=True)

        res = c.follow(job, on_progress=bar if tty else None, timeout_s=a.timeout_s)
        if tty:
            print(file=sys.stderr)
    except ServiceError as e:
        if a.json:
            print(json.dumps({"job_id": e.job_id, "status": "FAILED", "error_code": e.code,
                              "error": e.message}))
        print(f"mprefill_client: error: {e}", file=sys.stderr)
        return 1
    except (OSError, RuntimeError, TimeoutError, ConnectionError) as e:
        print(f"mprefill_client: error: {e}", file=sys.stderr)
        return 1
    if a.json:
        print(json.dumps(res))
    else:
        print(res["text"] if res["text"] else ",".join(map(str, res["generated_ids"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
