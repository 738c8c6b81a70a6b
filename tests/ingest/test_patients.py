"""The patient secret, and the split policy as a pure function of the patient."""

from __future__ import annotations

import hashlib
import hmac
import json
import stat

import pytest

from pneumo.ingest.patients import (
    PatientSecret,
    SplitPolicy,
    batch_policy,
    nih_patient,
    policy_of,
    resolve_secret,
)
from pneumo.shards import layout, manifest
from pneumo.shards.errors import ConfigError
from pneumo.shards.store import open_store

GOOD = "0123456789abcdef-a-good-secret"


def test_without_a_secret_one_is_created_once_in_the_config_folder(tmp_path):
    env = {"XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    first = resolve_secret(environ=env)
    path = tmp_path / "cfg" / "pneumo" / "patient-key"
    assert first.created and first.origin == str(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(first.value) >= 32 and path.read_text().strip() == first.value
    again = resolve_secret(environ=env)
    assert not again.created and again.value == first.value


def test_a_key_file_wins_over_the_variable_which_wins_over_the_config_file(tmp_path):
    env = {"XDG_CONFIG_HOME": str(tmp_path / "cfg"), "PNEUMO_PATIENT_KEY": GOOD}
    assert resolve_secret(environ=env).value == GOOD
    key_file = tmp_path / "key"
    key_file.write_text("another-secret-from-a-file\n")
    assert resolve_secret(key_file, environ=env).value == "another-secret-from-a-file"
    assert not (tmp_path / "cfg").exists()  # nothing created when a secret is given


@pytest.mark.parametrize("value", ["", "short", "x" * 15])
def test_a_short_secret_is_refused(tmp_path, value):
    env = {"XDG_CONFIG_HOME": str(tmp_path), "PNEUMO_PATIENT_KEY": value}
    if not value:  # empty: as if unset
        assert resolve_secret(environ=env).created
        return
    with pytest.raises(ConfigError, match="at least 16"):
        resolve_secret(environ=env)


def test_patient_keys_are_the_documented_hmac_and_the_check_reveals_nothing():
    secret = PatientSecret(GOOD, "test")
    want = hmac.new(GOOD.encode(), b"nih:00000001", hashlib.sha256).hexdigest()[:20]
    assert secret.key(nih_patient("00000001")) == want
    assert secret.key(nih_patient("00000001", basis="nih-xref")) == want  # basis is not keyed
    assert GOOD not in secret.check and secret.check != PatientSecret(GOOD + "!", "t").check


def _keys(n: int) -> list[str]:
    return [hashlib.sha256(str(i).encode()).hexdigest()[:20] for i in range(n)]


def test_the_split_is_a_pure_function_of_the_key_and_the_policy():
    keys = _keys(20_000)
    policy = SplitPolicy(fractions=(0.7, 0.2, 0.1))
    splits = [policy.split(k) for k in keys]
    assert splits == [SplitPolicy(fractions=(0.7, 0.2, 0.1)).split(k) for k in keys]
    shares = {s: splits.count(s) / len(keys) for s in ("train", "val", "test")}
    assert abs(shares["train"] - 0.7) < 0.015 and abs(shares["test"] - 0.1) < 0.01
    forced = frozenset(keys[:50])
    with_test = SplitPolicy(fractions=(0.7, 0.2, 0.1), forced_test=forced)
    assert all(with_test.split(k) == "test" for k in forced)
    assert all(with_test.split(k) == policy.split(k) for k in keys[50:])


def test_with_official_lists_only_listed_patients_are_test():
    keys = _keys(5_000)
    forced = frozenset(keys[:100])
    policy = SplitPolicy(fractions=(0.8, 0.1, 0.1), forced_test=forced, test_from_lists=True)
    splits = {k: policy.split(k) for k in keys}
    assert {k for k, s in splits.items() if s == "test"} == forced
    val = sum(s == "val" for s in splits.values()) / (len(keys) - 100)
    assert abs(val - 1 / 9) < 0.015  # 0.1 / (0.8 + 0.1) of the others


def test_the_policy_round_trips_through_json():
    policy = SplitPolicy(
        fractions=(0.6, 0.2, 0.2),
        forced_test=frozenset(_keys(3)),
        test_from_lists=True,
        secret_check="abc",
        lists=("test_list.txt 00ff",),
    )
    back = SplitPolicy.from_json(json.loads(json.dumps(policy.to_json())))
    assert back == policy and back.fingerprint() == policy.fingerprint()


def _committed(tmp_path, policy: SplitPolicy):
    store = open_store(tmp_path / "ds")
    manifest.write_settings(store, {"schema_version": 2, "split_policy": policy.to_json()})
    row = {"key": "k", "image_id": "k", "dataset": "siim", "batch": "b0", "split": "train"}
    manifest.write_part(store, layout.manifest_part("siim", "b0"), manifest.to_table([row]))
    return store


def test_the_first_committed_batch_fixes_the_policy(tmp_path):
    secret = PatientSecret(GOOD, "test")
    fixed = SplitPolicy(forced_test=frozenset(["a"]), secret_check=secret.check)
    store = _committed(tmp_path, fixed)
    later = SplitPolicy(forced_test=frozenset(["a", "b"]), secret_check=secret.check)
    got = batch_policy(store, later, fractions_given=False)
    assert got.policy == fixed and got.extra_test == {"b"} and not got.write
    assert got.effective.split("b") == "test"
    with pytest.raises(ConfigError, match="fixed at"):
        batch_policy(store, SplitPolicy(fractions=(0.5, 0.25, 0.25)), fractions_given=True)
    other = SplitPolicy(secret_check=PatientSecret(GOOD + "!", "x").check)
    with pytest.raises(ConfigError, match="another secret"):
        batch_policy(store, other, fractions_given=False)


def test_the_first_batch_fixes_the_policy_before_reading_a_file(tmp_path):
    store = open_store(tmp_path / "ds")
    mine = SplitPolicy(fractions=(0.5, 0.25, 0.25), secret_check="x")
    got = batch_policy(store, mine, fractions_given=True)
    assert got.policy == mine and not got.write  # written now, not at commit
    assert policy_of(manifest.read_settings(store)) == mine
    with pytest.raises(ConfigError, match="fixed at"):  # even though nothing is committed
        batch_policy(store, SplitPolicy(secret_check="x"), fractions_given=True)


def test_first_batches_racing_with_different_policies_write_exactly_one(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    store = open_store(tmp_path / "ds")
    policies = [SplitPolicy(fractions=(0.5 + i / 100, 0.25, 0.25 - i / 100), secret_check="x")
                for i in range(8)]  # fmt: skip

    def start(policy):
        try:
            return batch_policy(store, policy, fractions_given=True).policy
        except ConfigError:
            return None

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(start, policies))
    stored = policy_of(manifest.read_settings(store))
    assert stored in policies
    assert got.count(stored) == 1 and got.count(None) == 7  # the others refused


def test_a_schema_1_dataset_keeps_its_fractions_and_adopts_the_secret(tmp_path):
    store = open_store(tmp_path / "ds")
    row = {"key": "k", "image_id": "k", "dataset": "siim", "batch": "b0", "split": "train"}
    manifest.write_part(store, layout.manifest_part("siim", "b0"), manifest.to_table([row]))
    manifest.write_settings(store, {"schema_version": 1, "split_fractions": [0.7, 0.15, 0.15]})
    got = batch_policy(store, SplitPolicy(secret_check="c"), fractions_given=False)
    assert got.policy.fractions == (0.7, 0.15, 0.15) and got.policy.secret_check == "c"
    assert got.write


def test_a_batch_under_another_secret_is_refused_in_one_line(shared_data, tmp_path, pneumo):
    import os

    sample = shared_data / "siim" / "sample_images"
    dicoms = sorted(sample.glob("*.dcm"))
    first, second = tmp_path / "a", tmp_path / "b"
    for folder, chunk in ((first, dicoms[:2]), (second, dicoms[2:4])):
        folder.mkdir()
        for p in chunk:
            (folder / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "ds"
    env = dict(os.environ)
    try:
        os.environ["PNEUMO_PATIENT_KEY"] = GOOD
        pneumo("ingest", "siim", str(first), "--out", str(out))
        os.environ["PNEUMO_PATIENT_KEY"] = GOOD + "-other"
        proc = pneumo("ingest", "siim", str(second), "--out", str(out), check=False)
    finally:
        os.environ.clear()
        os.environ.update(env)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1 and "another secret" in errors[0]
    assert "Traceback" not in proc.stderr and GOOD not in proc.stderr
    settings = (out / "_pneumo.json").read_text()
    assert GOOD not in settings and PatientSecret(GOOD, "t").check in settings
    assert len(manifest.read(open_store(out)).to_pylist()) == 2
