"""The patient secret and the DICOM patient rule, case by case.

Written against what mutmut found the other tests let through: where the secret comes
from and what its messages name, the permissions of what it creates, the race between
two first runs, and the rule's refusals and canonical order.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import stat
from pathlib import Path

import pytest

from pneumo.ingest import patients
from pneumo.ingest.patients import (
    DicomPatientRule,
    PatientSecret,
    default_secret_path,
    resolve_secret,
)
from pneumo.shards.errors import ConfigError

GOOD = "0123456789abcdef-a-good-secret"


def test_a_created_secret_is_64_hex_characters_in_a_private_folder(tmp_path):
    secret = resolve_secret(environ={"XDG_CONFIG_HOME": str(tmp_path / "cfg")})
    assert re.fullmatch("[0-9a-f]{64}", secret.value)  # 32 random bytes
    folder = tmp_path / "cfg" / "pneumo"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert secret.origin == str(folder / "patient-key")


def test_a_secret_is_created_in_a_config_folder_that_already_exists(tmp_path):
    (tmp_path / "pneumo").mkdir()
    secret = resolve_secret(environ={"XDG_CONFIG_HOME": str(tmp_path)})
    assert secret.created and (tmp_path / "pneumo" / "patient-key").read_text().strip() == (
        secret.value
    )


def test_each_source_names_itself_as_the_origin(tmp_path):
    env = {"XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    assert resolve_secret(environ={**env, "PNEUMO_PATIENT_KEY": GOOD}).origin == (
        "PNEUMO_PATIENT_KEY"
    )
    key_file = tmp_path / "key"
    key_file.write_text(GOOD)
    from_file = resolve_secret(key_file, environ=env)
    assert (from_file.value, from_file.origin) == (GOOD, f"key file {key_file}")
    created = resolve_secret(environ=env)
    again = resolve_secret(environ=env)
    path = str(tmp_path / "cfg" / "pneumo" / "patient-key")
    assert (again.value, again.origin, again.created) == (created.value, path, False)


def test_without_environ_the_process_environment_is_read(tmp_path, monkeypatch):
    monkeypatch.setenv("PNEUMO_PATIENT_KEY", GOOD)
    assert resolve_secret().value == GOOD
    monkeypatch.delenv("PNEUMO_PATIENT_KEY")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert default_secret_path() == tmp_path / "xdg" / "pneumo" / "patient-key"


def test_the_default_folder_is_dot_config_in_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_secret_path({}) == tmp_path / ".config" / "pneumo" / "patient-key"
    assert default_secret_path({"XDG_CONFIG_HOME": ""}) == default_secret_path({})


def test_sixteen_characters_are_enough_and_a_short_secret_names_its_origin(tmp_path):
    env = {"XDG_CONFIG_HOME": str(tmp_path)}
    assert resolve_secret(environ={**env, "PNEUMO_PATIENT_KEY": "x" * 16}).value == "x" * 16
    with pytest.raises(ConfigError) as e:
        resolve_secret(environ={**env, "PNEUMO_PATIENT_KEY": "x" * 15})
    assert str(e.value) == (  # and how to make a good one
        "the patient secret in PNEUMO_PATIENT_KEY has 15 characters: use at least 16 random "
        "ones (python -c 'import secrets; print(secrets.token_hex(32))')"
    )
    short = tmp_path / "short-key"
    short.write_text("abc\n")
    with pytest.raises(ConfigError, match=re.escape(f"{short} has 3 characters")):
        resolve_secret(short, environ=env)


def test_an_unreadable_secret_file_is_named(tmp_path):
    binary = tmp_path / "binary-key"
    binary.write_bytes(b"\xff\xfe" * 20)
    with pytest.raises(ConfigError, match=f"cannot read the patient secret file {binary}"):
        resolve_secret(binary, environ={})


def test_a_secret_that_cannot_be_created_says_what_to_do(tmp_path):
    blocker = tmp_path / "cfg"
    blocker.write_text("a file where the config folder should be")
    with pytest.raises(ConfigError) as e:
        resolve_secret(environ={"XDG_CONFIG_HOME": str(blocker)})
    message = str(e.value)
    assert message.startswith(f"cannot create the patient secret {blocker}/pneumo/patient-key")
    assert "set PNEUMO_PATIENT_KEY or give --patient-key-file" in message


def test_a_secret_created_by_another_process_first_is_used(tmp_path, monkeypatch):
    """Two first runs at once: the one whose exclusive create fails reads the winner's."""
    path = tmp_path / "pneumo" / "patient-key"
    path.parent.mkdir()
    path.write_text(GOOD + "\n")
    os.chmod(path, 0o600)
    monkeypatch.setattr(Path, "exists", lambda self: False)  # it looked before the other wrote
    secret = resolve_secret(environ={"XDG_CONFIG_HOME": str(tmp_path)})
    assert (secret.value, secret.origin, secret.created) == (GOOD, str(path), False)


@pytest.mark.parametrize(
    "mode, warns", [(0o600, False), (0o400, False), (0o644, True), (0o640, True)]
)
def test_a_secret_file_others_can_read_is_warned_about(tmp_path, caplog, mode, warns):
    path = tmp_path / "pneumo" / "patient-key"
    path.parent.mkdir()
    path.write_text(GOOD)
    os.chmod(path, mode)
    with caplog.at_level(logging.WARNING, logger=patients.__name__):
        assert resolve_secret(environ={"XDG_CONFIG_HOME": str(tmp_path)}).value == GOOD
    assert ("readable by other users" in caplog.text) is warns


def test_keys_strip_the_raw_id_and_depend_on_namespace_and_secret():
    secret = PatientSecret(GOOD, "t")
    a = patients.Patient("dicom:PatientID", " 123 ", "dicom-patient-id")
    want = hmac.new(GOOD.encode(), b"dicom:PatientID:123", hashlib.sha256).hexdigest()[:20]
    assert secret.key(a) == want
    assert (
        secret.check == hmac.new(GOOD.encode(), b"pneumo:secret-check", "sha256").hexdigest()[:16]
    )


# The rule.


def test_an_unknown_or_empty_rule_lists_the_attributes_that_exist():
    for attributes in (("PatientName",), ()):
        with pytest.raises(ConfigError) as e:
            DicomPatientRule(attributes)
        assert str(e.value) == (
            f"--patient-attribute {'+'.join(attributes)!r}: expected one or more of "
            "IssuerOfPatientID, PatientID, OtherPatientIDs joined by '+' (names as the DICOM "
            "standard spells them), e.g. IssuerOfPatientID+PatientID"
        )
    with pytest.raises(ConfigError, match=r"'PatientID\+Sex'"):  # the spec as given
        DicomPatientRule.parse("PatientID+Sex")


def test_two_different_attributes_are_a_valid_rule_and_the_issuer_alone_is_not():
    rule = DicomPatientRule(("OtherPatientIDs", "PatientID", "IssuerOfPatientID"))
    assert rule.attributes == ("IssuerOfPatientID", "PatientID", "OtherPatientIDs")
    assert rule.ids == ("PatientID", "OtherPatientIDs")
    assert rule.basis == "dicom:IssuerOfPatientID+PatientID+OtherPatientIDs"
    with pytest.raises(ConfigError, match="names an attribute twice"):
        DicomPatientRule(("PatientID", "OtherPatientIDs", "PatientID"))
    with pytest.raises(ConfigError) as e:
        DicomPatientRule(("IssuerOfPatientID",))
    assert str(e.value) == (
        "--patient-attribute 'IssuerOfPatientID': IssuerOfPatientID only scopes an id; "
        "name PatientID or OtherPatientIDs with it (IssuerOfPatientID+PatientID)"
    )


def test_the_patient_is_the_hashable_json_of_the_named_values():
    rule = DicomPatientRule.parse("IssuerOfPatientID+PatientID")
    p = rule.patient({"IssuerOfPatientID": " HOSP-A ", "PatientID": "42"}, "img")
    assert (p.namespace, p.raw_id) == (
        "dicom:IssuerOfPatientID+PatientID",
        json.dumps(["HOSP-A", "42"]),
    )
    assert p.basis == "dicom:IssuerOfPatientID+PatientID"
    # The issuer may be empty (an empty scope); an empty PatientID leaves the image alone.
    scoped = rule.patient({"PatientID": "42"}, "img")
    assert scoped.raw_id == json.dumps(["", "42"]) and scoped != p
    alone = rule.patient({"IssuerOfPatientID": "HOSP-A", "PatientID": "  "}, "img-7")
    assert alone == patients.Patient("dicom-image", "img-7", "dicom-image")
    missing = DicomPatientRule().patient({}, "img-8")  # no PatientID element at all
    assert missing == patients.Patient("dicom-image", "img-8", "dicom-image")
    # Non-ASCII ids are kept as written (UTF-8), not escaped: the key hashes those bytes.
    umlaut = rule.patient({"IssuerOfPatientID": "KLINIK-Ä", "PatientID": "7"}, "img")
    assert umlaut.raw_id == '["KLINIK-Ä", "7"]'
    default = DicomPatientRule().patient({"PatientID": " 42 "}, "img")
    assert (default.raw_id, default.basis) == ("42", "dicom-patient-id")


def test_other_patient_ids_are_one_set_whatever_their_order_blanks_or_repeats():
    rule = DicomPatientRule.parse("OtherPatientIDs")
    a = rule.patient({"OtherPatientIDs": "B\\A\\ A\\\\"}, "x")
    assert a.raw_id == "A\\B"
    assert rule.patient({"OtherPatientIDs": "\\ \\"}, "y") == patients.Patient(
        "dicom-image", "y", "dicom-image"
    )
    plain = DicomPatientRule.parse("PatientID").patient({"PatientID": "B\\A"}, "z")
    assert plain.raw_id == "B\\A"  # only OtherPatientIDs is a list
