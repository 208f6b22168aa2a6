#!/usr/bin/env python3
"""Writes the seed corpus of every fuzz target into fuzz/corpus/<target>/ from real examples.

Why: libFuzzer reaches deep code (a token that decrypts, a blob that unmarshals, a config
that passes its checks) far sooner from well-formed inputs. The keys, secret and machine id
are the fixed ones the targets use, so a seed token opens inside the `license_token` target.
Run from the repository root: python3 fuzz/seeds/make_seeds.py (needs python3-cryptography),
then `cargo fuzz cmin` each target (scripts/fuzz.sh --cmin).
"""
import base64, hashlib, json, os, struct, subprocess, sys, tempfile
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "fuzz" / "corpus"
MACHINE = b"fuzz-machine-id!"
SECRET = bytes([9] * 32)
SERVER = ed25519.Ed25519PrivateKey.from_private_bytes(bytes([7] * 32))
MACHINE_UUID = "66757a7a-2d6d-6163-6869-6e652d696421"  # the 16 bytes of MACHINE
NONCE = "00112233445566778899aabbccddeeff"


def write(target, name, data):
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())


def hkdf(salt, ikm, info, n):
    return HKDF(algorithm=hashes.SHA256(), length=n, salt=salt, info=info).derive(ikm)


def token(claims, version=3, fmt=2):
    vk = SERVER.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    header = b"LSA" + bytes([fmt])
    if fmt == 2:
        header += hashlib.sha256(vk).digest()[:8]
    header += MACHINE + struct.pack(">Q", version)
    claims_json = json.dumps(claims, separators=(",", ":")).encode()
    key = hkdf(b"lsa/token/v1", SECRET, MACHINE + struct.pack(">Q", version), 32)
    nonce = hkdf(b"lsa/token-nonce/v1", key, hashlib.sha256(claims_json).digest(), 12)
    header += nonce
    sig = SERVER.sign(b"lsa/license/v1" + header + claims_json)
    body = AESGCM(key).encrypt(nonce, sig + claims_json, header)
    return base64.b64encode(header + body).decode()


CLAIMS = {
    "license_id": "0b5f2a52-8d8e-4c50-9d7e-3f0c1c2b9a11",
    "client_id": "550e8400-e29b-41d4-a716-446655440000",
    "machine_id": MACHINE_UUID,
    "features": ["pos.sale", "pos.refund"],
    "metadata": {"tier": "gold"},
    "issued_at": 1700000000,
    "not_before": 1700000000,
    "expires_at": 1800000000,
}


def csr_pem():
    key = ec.generate_private_key(ec.SECP256R1())
    from cryptography import x509
    from cryptography.x509.oid import NameOID
    req = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pos-1")]))
        .sign(key, hashes.SHA256())
    )
    return req.public_bytes(serialization.Encoding.PEM).decode(), key


def main():
    tok = token(CLAIMS)
    tok_v1 = token(dict(CLAIMS, expires_at=None, metadata={}), version=1, fmt=1)
    # ipc_request: a 4-byte header, then the payload (as on the socket).
    for i, payload in enumerate([
        {"op": "validate_license", "license_token": tok, "nonce": NONCE},
        {"op": "validate_license", "license_token": "AAECAw==", "nonce": NONCE},
        {"op": "format_disk", "nonce": NONCE},
        {"op": "validate_license", "license_token": "A", "nonce": "short"},
    ]):
        body = json.dumps(payload).encode()
        write("ipc_request", f"seed{i}", struct.pack(">I", len(body)) + body)
    write("ipc_request", "not_json", struct.pack(">I", 8) + b"not json")
    # mgmt_request: every op.
    for i, req in enumerate([
        {"op": "status"}, {"op": "metrics", "token": "t"},
        {"op": "validate", "license_token": tok}, {"op": "rotate"},
        {"op": "invalidate", "version": 3, "token": "t"}, {"op": "degraded", "mode": "auto"},
        {"op": "format_disk"},
    ]):
        write("mgmt_request", f"seed{i}", json.dumps(req))
    # license_token: tokens that open under the target's fixed secret and key; claims.
    write("license_token", "token_v2", tok)
    write("license_token", "token_v1", tok_v1)
    write("license_token", "claims", json.dumps(CLAIMS))
    # secret_blob: an ECIES delivery blob to the target's machine key, an at-rest blob.
    machine_key = ec.derive_private_key(int.from_bytes(bytes([5] * 32), "big"), ec.SECP256R1())
    eph = ec.generate_private_key(ec.SECP256R1())
    point = lambda k: k.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    z = eph.exchange(ec.ECDH(), machine_key.public_key())
    e, r = point(eph), point(machine_key)
    k = hkdf(b"lsa/secret-delivery/v1", z, e + r, 32)
    n = os.urandom(12)
    aad = MACHINE + struct.pack(">Qqqq", 3, 1, 2, 3)
    write("secret_blob", "delivery", b"\x01" + e + n + AESGCM(k).encrypt(n, bytes([1] * 32), aad))
    n = os.urandom(12)
    write("secret_blob", "at_rest", n + AESGCM(bytes([6] * 32)).encrypt(n, bytes([2] * 32), b"aad"))
    # secret_store_file: secret.enc as the agent writes it.
    store = {
        "format": 1, "kdf": "pbkdf2-hmac-sha256", "iterations": 210000,
        "salt": base64.b64encode(bytes(range(16))).decode(),
        "secrets": [{"version": v, "valid_from": 1700000000, "valid_until": 1700172800,
                     "grace_until": 1700777600, "ct": base64.b64encode(os.urandom(60)).decode()}
                    for v in (2, 3)],
    }
    write("secret_store_file", "secret.enc", json.dumps(store, indent=2))
    # tpm_blob: version 1, kind, TPM2B_PUBLIC (our templates), TPM2B_PRIVATE.
    def tpm2b(b):
        return struct.pack(">H", len(b)) + b
    sealed_public = struct.pack(">HHI", 0x0008, 0x000B, 0x452) + tpm2b(b"") + struct.pack(">H", 0x0010) + tpm2b(os.urandom(32))
    ecc_public = (struct.pack(">HHI", 0x0023, 0x000B, 0x60472) + tpm2b(b"")
                  + struct.pack(">HHHH", 0x0010, 0x0010, 0x0003, 0x0010)
                  + tpm2b(e[1:33]) + tpm2b(e[33:]))
    private = tpm2b(tpm2b(os.urandom(32)) + tpm2b(os.urandom(16)) + os.urandom(80))
    write("tpm_blob", "sealed", bytes([1, 1]) + tpm2b(sealed_public) + private)
    write("tpm_blob", "machine_key", bytes([1, 2]) + tpm2b(ecc_public) + private)
    # Request bodies.
    # installer_trailer: a minimal PE32+ stub with a trailer (license_protocol::installer).
    stub = bytearray(0x200)
    stub[0:2] = b"MZ"
    stub[0x3c:0x40] = struct.pack("<I", 0x80)
    stub[0x80:0x84] = b"PE\0\0"
    stub[0x98:0x9a] = struct.pack("<H", 0x20b)
    stub[0x98 + 108:0x98 + 112] = struct.pack("<I", 16)
    payload = json.dumps({"server": "https://licenses.example:8443",
                          "pin": "sha256:" + base64.b64encode(b"\x01" * 32).decode(),
                          "token": "lit_0123456789abcdef"}, separators=(",", ":")).encode()
    while (len(payload) + 46) % 8:
        payload += b" "
    trailer = (payload + hashlib.sha256(payload).digest() + struct.pack("<I", len(payload))
               + struct.pack("<H", 1) + b"LSA-INST")
    write("installer_trailer", "tagged.exe", bytes(stub) + trailer)
    write("installer_trailer", "plain.exe", bytes(stub))

    pem, key = csr_pem()
    write("csr", "p256.csr", pem)
    write("bootstrap_request", "csr", json.dumps({
        "token": "inst_3f9a", "hostname": "pos-1.shop.example", "hardware_id": "4c4c4544-0042",
        "arch": "x86_64", "csr": pem}))
    write("bootstrap_request", "seed_mode", json.dumps({
        "token": "inst_3f9a", "hostname": "pos-1", "hardware_id": "hw:1", "arch": "aarch64",
        "previous_key_signature": base64.b64encode(b"0\x06\x02\x01\x01\x02\x01\x01").decode()}))
    write("recover_request", "recover", json.dumps({
        "machine_id": MACHINE_UUID, "recovery_token": "rec_0123456789abcdef", "csr": pem}))
    write("rotate_request", "rotate", json.dumps({
        "current_secret_version": 3, "agent_id": MACHINE_UUID, "timestamp": 1700000000,
        "nonce": NONCE, "signature": base64.b64encode(b"0\x06\x02\x01\x01\x02\x01\x01").decode()}))
    write("rotate_request", "ack", json.dumps({"secret_version": 3.0}))
    write("health_report", "health", json.dumps({
        "agent_version": "0.1.0", "store": "tpm", "tpm_enabled": True, "tpm_available": True,
        "degraded_mode": "inactive", "degraded_since": None, "last_rotation": 1700000000,
        "rotation_failures": 0, "clock_rollback_secs": None, "audit_chain_ok": True,
        "certificate_expires_at": 1731536000, "secret_version": 3}))
    # Config files: the shipped examples.
    write("agent_config", "example.toml", (ROOT / "packaging/agent-config.example.toml").read_text())
    write("server_config", "example.toml", (ROOT / "packaging/server.example.toml").read_text())
    # audit_line: lines as the writer writes them.
    for i, (event, details) in enumerate([
        ("audit.file_started", {"file": 1}),
        ("license.validate", {"license_id": CLAIMS["license_id"], "secret_version": 3, "verdict": "valid"}),
        ("mgmt.rotate", {"ratio": 0.1, "nested": {"b": [1, 2.5e-300], "a": None}}),
    ]):
        line = {"seq": i + 1, "time": "2026-04-01T12:00:00.123Z", "event": event,
                "actor": {"uid": 0, "pid": 42}, "outcome": "success", "details": details,
                "prev_hash": "0" * 64, "hash": hashlib.sha256(event.encode()).hexdigest()}
        write("audit_line", f"seed{i}", json.dumps(line, separators=(",", ":")))


if __name__ == "__main__":
    main()
