#!/usr/bin/env python3
"""Decrypts a broker.v1 release with the umbral-pre 0.11 package from PyPI, from the
bytes documented in docs/FORMATS.md alone.

Usage: decrypt_release.py RESEARCHER_KEY_FILE RELEASE.jsonl OUT_DIR

RELEASE.jsonl holds one ReleaseItem per line, bytes fields in hex: subject, category,
version, sealed, delegating_key, verifying_key, cfrags (a list). Each decrypted research
copy is written to OUT_DIR/<subject>/<category>.v<version>.json.

Requires: pip install umbral-pre==0.11.0 zstandard
"""
import json
import os
import struct
import sys

import umbral_pre
import zstandard

MAGIC = b"PKE1"


def researcher_key(path):
    lines = [l.split() for l in open(path) if l.strip() and not l.startswith("#")]
    if len(lines) != 1 or lines[0][0] != "PREKMS-SECRET-1" or len(lines[0]) != 3:
        sys.exit(f"{path}: not a pre-kms secret key file")
    seed = bytes.fromhex(lines[0][2])
    return umbral_pre.SecretKeyFactory.from_secure_randomness(seed).make_key(b"encryption")


def split_envelope(sealed):
    if sealed[:4] != MAGIC:
        raise ValueError("not an envelope")
    (length,) = struct.unpack(">I", sealed[4:8])
    return sealed[8 : 8 + length], sealed[8 + length :]


def main(key_path, release_path, out_dir):
    sk = researcher_key(key_path)
    receiving_pk = sk.public_key()
    count = 0
    for line in open(release_path):
        item = json.loads(line)
        capsule_bytes, ciphertext = split_envelope(bytes.fromhex(item["sealed"]))
        capsule = umbral_pre.Capsule.from_bytes(capsule_bytes)
        delegating_pk = umbral_pre.PublicKey.from_compressed_bytes(bytes.fromhex(item["delegating_key"]))
        verifying_pk = umbral_pre.PublicKey.from_compressed_bytes(bytes.fromhex(item["verifying_key"]))
        verified = [
            umbral_pre.CapsuleFrag.from_bytes(bytes.fromhex(c)).verify(capsule, verifying_pk, delegating_pk, receiving_pk)
            for c in item["cfrags"]
        ]
        compressed = umbral_pre.decrypt_reencrypted(sk, delegating_pk, capsule, verified, ciphertext)
        plaintext = zstandard.ZstdDecompressor().decompress(compressed, max_output_size=256 << 20)
        folder = os.path.join(out_dir, item["subject"])
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{item['category']}.v{item['version']}.json"), "wb") as f:
            f.write(plaintext)
        count += 1
    print(f"decrypted {count} records")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
