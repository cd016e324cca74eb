"""`shoal.trust.keys` and `shoal keys`: API keys kept hashed, checked, revoked at once."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shoal.cli.keys import keys_app
from shoal.errors import ConfigError
from shoal.trust.keys import KEY_PREFIX, KEYS_FILE, KeyNameError, KeyStore, key_id


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    return KeyStore.in_data_dir(tmp_path / "data")


# -- the store --------------------------------------------------------------------------


def test_a_new_key_is_random_prefixed_and_only_its_hash_is_kept(store: KeyStore) -> None:
    record, secret = store.create("laptop")
    other, other_secret = store.create("phone")

    assert secret.startswith(KEY_PREFIX) and len(secret) == len(KEY_PREFIX) + 43
    assert secret != other_secret and record.id != other.id
    assert record.id == secret[len(KEY_PREFIX) :][:8] == key_id(secret)
    assert record.name == "laptop" and record.created.endswith("Z")
    assert record.sha256 == hashlib.sha256(secret.encode()).hexdigest()

    text = store.path.read_text()
    assert secret not in text and secret[len(KEY_PREFIX) :] not in text
    assert json.loads(text)["keys"][0] == {
        "id": record.id,
        "name": "laptop",
        "created": record.created,
        "sha256": record.sha256,
    }
    assert record.public() == {"id": record.id, "name": "laptop", "created": record.created}


def test_the_file_is_private_and_written_atomically(store: KeyStore) -> None:
    store.create("laptop")
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    # Only the key file and its lock: no temp file is left behind.
    assert sorted(p.name for p in store.path.parent.iterdir()) == [KEYS_FILE, KEYS_FILE + ".lock"]


def test_a_loosened_file_mode_is_tightened_on_read(store: KeyStore) -> None:
    store.create("laptop")
    store.path.chmod(0o644)
    assert len(KeyStore(store.path).list()) == 1
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600


def test_verify_accepts_only_the_exact_key(store: KeyStore) -> None:
    record, secret = store.create("laptop")
    assert store.verify(secret) == record
    wrong_tail = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    for candidate in (
        wrong_tail,  # right ID, wrong key
        secret + "x",
        secret[:-1],
        KEY_PREFIX + secret[len(KEY_PREFIX) :].swapcase(),
        "",
        KEY_PREFIX,
        secret[len(KEY_PREFIX) :],  # the key without its prefix
        "shoal-sk-ünïcödé-and-more-text",
        record.sha256,  # the stored hash is not a key
    ):
        assert store.verify(candidate) is None, candidate


def test_an_empty_or_missing_store_knows_no_key(store: KeyStore) -> None:
    assert store.list() == ()
    assert store.verify(KEY_PREFIX + "A" * 43) is None
    assert store.revoke("anything") is None
    assert not store.path.exists()


def test_revoke_by_id_or_by_name(store: KeyStore) -> None:
    laptop, laptop_key = store.create("laptop")
    phone, phone_key = store.create("phone")
    assert store.revoke(laptop.id) == laptop
    assert store.verify(laptop_key) is None
    assert store.verify(phone_key) == phone
    assert store.revoke("phone") == phone
    assert store.verify(phone_key) is None
    assert store.revoke("phone") is None
    assert store.list() == ()


def test_a_revocation_by_another_process_is_seen_at_once(tmp_path: Path) -> None:
    """The node's store and the CLI's store are different objects on one file; the node
    must refuse a key revoked by the CLI on the very next request, even within the same
    mtime tick (the file is replaced, so its inode changes)."""
    serving = KeyStore.in_data_dir(tmp_path)
    record, secret = KeyStore.in_data_dir(tmp_path).create("laptop")
    assert serving.verify(secret) == record

    assert KeyStore.in_data_dir(tmp_path).revoke("laptop") == record
    assert serving.verify(secret) is None

    _, new_secret = KeyStore.in_data_dir(tmp_path).create("laptop")
    assert serving.verify(new_secret) is not None
    (tmp_path / KEYS_FILE).unlink()  # deleting the file revokes every key
    assert serving.verify(new_secret) is None


def test_names_are_checked(store: KeyStore) -> None:
    store.create("laptop")
    with pytest.raises(KeyNameError, match="exists"):
        store.create("laptop")
    with pytest.raises(KeyNameError, match="exists"):
        store.create("  laptop ")
    for bad in ("", "   ", "x" * 65, "tab\there", "new\nline"):
        with pytest.raises(KeyNameError):
            store.create(bad)
    # A pasted key as a name would be stored in the clear.
    with pytest.raises(KeyNameError, match="must not start"):
        store.create(KEY_PREFIX + "A" * 43)
    assert [r.name for r in store.list()] == ["laptop"]


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[]",
        '{"version": 2, "keys": []}',
        '{"version": 1}',
        '{"version": 1, "keys": [{"id": "a", "name": "b"}]}',
        '{"version": 1, "keys": [{"id": "a", "name": "b", "created": "c", "sha256": "zz"}]}',
        '{"version": 1, "keys": [{"id": "a", "name": "b", "created": "c", "sha256": "00"}]}',
        '{"version": 1, "keys": [{"id": 1, "name": "b", "created": "c", "sha256": "00"}]}',
        '{"version": 1, "keys": ["shoal-sk-looks-like-a-pasted-key"]}',
    ],
)
def test_a_corrupt_file_is_a_clear_error(store: KeyStore, content: str) -> None:
    store.path.parent.mkdir(parents=True)
    store.path.write_text(content)
    with pytest.raises(ConfigError, match="is not a valid API key file") as caught:
        store.verify(KEY_PREFIX + "A" * 43)
    assert str(store.path) in caught.value.message
    assert "shoal-sk-looks" not in caught.value.message  # the content is never quoted
    with pytest.raises(ConfigError):
        store.create("laptop")
    assert store.path.read_text() == content  # a broken file is not overwritten


def test_concurrent_creates_lose_no_key(tmp_path: Path) -> None:
    secrets: list[str] = []

    def make(worker: int) -> None:
        store = KeyStore.in_data_dir(tmp_path)  # its own file descriptors, like a process
        for i in range(5):
            secrets.append(store.create(f"w{worker}-{i}")[1])

    threads = [threading.Thread(target=make, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    store = KeyStore.in_data_dir(tmp_path)
    assert len(store.list()) == 30
    assert all(store.verify(secret) is not None for secret in secrets)


# -- `shoal keys` -----------------------------------------------------------------------


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No SHOAL_* from outside; the default data dir under tmp."""
    for key in list(os.environ):
        if key.upper().startswith("SHOAL_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    return tmp_path / "xdg-data" / "shoal"


def test_cli_create_list_revoke(cli_env: Path) -> None:
    runner = CliRunner()
    created = runner.invoke(keys_app, ["create", "laptop"])
    assert created.exit_code == 0, created.output
    secret = created.stdout.strip()
    assert secret.startswith(KEY_PREFIX) and "\n" not in secret
    assert "not shown again" in created.stderr.replace("\n", " ")

    store = KeyStore.in_data_dir(cli_env)
    record = store.verify(secret)
    assert record is not None and record.name == "laptop"

    listed = runner.invoke(keys_app, ["list", "--json"])
    assert listed.exit_code == 0
    assert json.loads(listed.stdout) == {"keys": [record.public()]}
    table = runner.invoke(keys_app, ["list"])
    assert record.id in table.stdout and "laptop" in table.stdout
    for output in (listed.stdout, table.stdout, table.stderr):
        assert secret not in output and record.sha256 not in output

    again = runner.invoke(keys_app, ["create", "laptop"])
    assert again.exit_code == 1 and "exists" in again.stderr

    revoked = runner.invoke(keys_app, ["revoke", record.id])
    assert revoked.exit_code == 0 and record.id in revoked.stdout
    assert store.verify(secret) is None
    missing = runner.invoke(keys_app, ["revoke", record.id])
    assert missing.exit_code == 1 and "no API key" in missing.stderr

    empty = runner.invoke(keys_app, ["list", "--json"])
    assert json.loads(empty.stdout) == {"keys": []}


def test_cli_create_json_and_data_dir_flag(cli_env: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    result = CliRunner().invoke(keys_app, ["create", "ci", "--json", "--data-dir", str(elsewhere)])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert set(document) == {"id", "name", "created", "key"}
    assert KeyStore.in_data_dir(elsewhere).verify(document["key"]) is not None
    assert not (cli_env / KEYS_FILE).exists()


def test_cli_bad_config_and_corrupt_file_exit_2(cli_env: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    bad = tmp_path / "bad.toml"
    bad.write_text("port = 'eleven'\n")
    for args in (["create", "x"], ["list"], ["revoke", "x"]):
        result = runner.invoke(keys_app, [*args, "--config", str(bad)])
        assert result.exit_code == 2, (args, result.output)
        assert "port" in result.stderr

    cli_env.mkdir(parents=True)
    (cli_env / KEYS_FILE).write_text("{broken")
    for args in (["create", "x"], ["list"], ["revoke", "x"]):
        result = runner.invoke(keys_app, args)
        assert result.exit_code == 2, (args, result.output)
        assert "not a valid API key file" in result.stderr.replace("\n", " ")


def test_cli_refuses_a_bad_name(cli_env: Path) -> None:
    result = CliRunner().invoke(keys_app, ["create", KEY_PREFIX + "A" * 43])
    assert result.exit_code == 1
    assert not (cli_env / KEYS_FILE).exists()


def test_a_key_may_carry_a_weight_kept_in_the_file(tmp_path: Path) -> None:
    store = KeyStore.in_data_dir(tmp_path)
    record, _ = store.create("batch", weight=5)
    plain, _ = store.create("laptop")
    again = {r.name: r for r in KeyStore.in_data_dir(tmp_path).list()}
    assert again["batch"].weight == 5 and again["laptop"].weight is None
    assert record.public()["weight"] == 5 and "weight" not in plain.public()
    for bad in (0, -1, float("nan"), 1e7):
        with pytest.raises(ValueError, match="weight"):
            store.create(f"bad-{bad}", weight=bad)
