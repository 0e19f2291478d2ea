"""lib.io.digest.sha256_file: the one SHA-256 of a file (weights versions, the quality gate's engine record)."""

import hashlib

from lib.io.digest import sha256_file


def test_the_digest_of_a_path_and_of_an_open_file_are_the_bytes_sha256(tmp_path):
    data = bytes(range(256)) * 9000  # 2.3 MB: more than one 1 MiB block
    p = tmp_path / "w.pt"
    p.write_bytes(data)
    assert sha256_file(str(p)) == hashlib.sha256(data).hexdigest()
    assert sha256_file(p) == hashlib.sha256(data).hexdigest()
    with open(p, "rb") as f:
        f.read(10)
        assert sha256_file(f) == hashlib.sha256(data[10:]).hexdigest()  # what is left to read
    p.write_bytes(data[:-1] + b"\x00")
    assert sha256_file(p) != hashlib.sha256(data).hexdigest()
