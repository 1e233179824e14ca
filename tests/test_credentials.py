"""Key files: private (0600) in private folders (0700), never written through a link; no CA key
left behind unless asked for."""

from __future__ import annotations

import stat

from fedaug_flwr.credentials import make_node_keys, make_tls_files


def mode(path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_a_node_key_replaces_a_readable_file_and_a_link_with_a_private_file(tmp_path):
    folder = tmp_path / "keys"
    folder.mkdir(mode=0o755)
    (folder / "node").write_text("old, world-readable")
    (folder / "node").chmod(0o644)
    target = tmp_path / "elsewhere"
    target.write_text("not a key")
    (folder / "node.pub").symlink_to(target)

    keys = make_node_keys(folder, "node")

    assert mode(keys.private_key) == 0o600 and mode(folder) == 0o700
    assert keys.private_key.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    assert not keys.public_key.is_symlink() and target.read_text() == "not a key"


def test_the_ca_key_is_not_kept_unless_asked_for(tmp_path):
    tls = make_tls_files(tmp_path / "tls")
    assert not (tmp_path / "tls" / "ca.key").exists()
    assert mode(tls.server_key) == 0o600 and mode(tmp_path / "tls") == 0o700
    assert tls.ca_certificate.is_file() and mode(tls.ca_certificate) == 0o644

    make_tls_files(tmp_path / "kept", keep_ca_key=True)
    assert mode(tmp_path / "kept" / "ca.key") == 0o600
    make_tls_files(tmp_path / "kept")  # a new CA: the old CA's key does not stay behind
    assert not (tmp_path / "kept" / "ca.key").exists()
