"""Patients: who an image belongs to, the keyed hash that names them, and their split.

Leakage is a patient-level problem (a model scored on a person it was trained on scores too
well), so every split decision is about patients, made the same way for every image of a
patient, in every batch and in both datasets:

* **Patient.** NIH rows: the Data_Entry ``Patient ID`` (basis ``nih-patient-id``). DICOM
  rows (``pneumo ingest dicom``, alias ``siim``), in order: the NIH patient of the image
  through ``--nih-xref`` (``nih-xref``), so the SIIM and NIH images of one person are one
  patient; else the DICOM PatientID (``dicom-patient-id``), or the attributes a
  :class:`DicomPatientRule` names (``dicom:IssuerOfPatientID+PatientID``, ...); else, when
  those are empty, the image itself (``dicom-image``). Kaggle SIIM PatientIDs are fresh
  pseudonyms on every image, so keyed on them SIIM is split by image, exactly as keying on
  the image would: only the xref makes SIIM patient-level. Bases ending in ``-image`` are
  image-level (``siim-image`` in datasets written before PatientIDs were used).
* **Key.** ``patient_key`` = HMAC-SHA256(secret, ``namespace:id``), truncated: linkable
  within pneumo, not reversible without the secret. NIH has only 30,805 patient ids, so a
  public or guessable secret would let anyone reverse every key by trying them all. The
  secret comes from ``PNEUMO_PATIENT_KEY``, a key file, or a random one created once in the
  user's config folder; ``_pneumo.json`` keeps only a check value of it.
* **Split.** :meth:`SplitPolicy.split`, a pure function of the key and the dataset's policy
  (fractions, forced-test patients, whether the official lists decide the test split),
  which the dataset's first committed batch fixes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pneumo.shards import layout, manifest
from pneumo.shards.errors import ConfigError
from pneumo.shards.store import Store

log = logging.getLogger(__name__)

SECRET_ENV = "PNEUMO_PATIENT_KEY"
MIN_SECRET_CHARS = 16
SECRET_FILE = "patient-key"  # under $XDG_CONFIG_HOME/pneumo (default ~/.config/pneumo)
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
_HELD_OUT_FIRST = ("test", "val", "train")

BASIS_NIH_PATIENT = "nih-patient-id"
BASIS_NIH_XREF = "nih-xref"
BASIS_DICOM_PATIENT_ID = "dicom-patient-id"
BASIS_DICOM_IMAGE = "dicom-image"
BASIS_SIIM_IMAGE = "siim-image"  # image-level SIIM rows of datasets written before
IMAGE_LEVEL_SUFFIX = "-image"

# The DICOM attributes that can name a patient (what ``--patient-attribute`` may name), in
# the order a rule joins them: the issuer scopes the ids after it. Every one is read by
# both DICOM readers (``pneumo.ingest.dicom`` and its lean path).
DICOM_PATIENT_ATTRIBUTES = ("IssuerOfPatientID", "PatientID", "OtherPatientIDs")
_QUALIFIERS = frozenset({"IssuerOfPatientID"})  # scopes an id; names no one alone


@dataclass(frozen=True)
class Patient:
    """Who an image belongs to: ``namespace:raw_id`` is hashed; ``basis`` says how it was
    found. Never stored or logged as such."""

    namespace: str
    raw_id: str = field(repr=False)  # a repr (a traceback, a log line) never shows it
    basis: str


def nih_patient(patient_id: str, basis: str = BASIS_NIH_PATIENT) -> Patient:
    """An NIH patient (8-digit id), found from Data_Entry or through the SIIM->NIH xref."""
    return Patient("nih", patient_id, basis)


def image_patient(image_id: str) -> Patient:
    """A DICOM image that is its own patient (no xref entry, no patient attribute)."""
    return Patient(BASIS_DICOM_IMAGE, image_id, BASIS_DICOM_IMAGE)


@dataclass(frozen=True)
class DicomPatientRule:
    """Which DICOM attributes name an image's patient (``--patient-attribute``).

    ``PatientID`` by default; sites that need more name several, joined by ``+``:
    ``IssuerOfPatientID+PatientID`` (the same PatientID under two issuers is two patients),
    ``OtherPatientIDs`` (its values sorted, so their order does not matter). The values
    are hashed together with the rule, never stored. An image whose named id attributes
    (all but ``IssuerOfPatientID``, which may be empty: an empty scope) are all empty is
    its own patient.
    """

    attributes: tuple[str, ...] = ("PatientID",)

    def __post_init__(self) -> None:
        unknown = [a for a in self.attributes if a not in DICOM_PATIENT_ATTRIBUTES]
        if unknown or not self.attributes:
            raise ConfigError(
                f"--patient-attribute {self.spec!r}: expected one or more of "
                f"{', '.join(DICOM_PATIENT_ATTRIBUTES)} joined by '+' (names as the DICOM "
                "standard spells them), e.g. IssuerOfPatientID+PatientID"
            )
        if len(set(self.attributes)) != len(self.attributes):
            raise ConfigError(f"--patient-attribute {self.spec!r} names an attribute twice")
        if set(self.attributes) <= _QUALIFIERS:
            raise ConfigError(
                f"--patient-attribute {self.spec!r}: IssuerOfPatientID only scopes an id; "
                "name PatientID or OtherPatientIDs with it (IssuerOfPatientID+PatientID)"
            )
        # One order whatever the user wrote: the same rule always makes the same keys.
        canonical = tuple(a for a in DICOM_PATIENT_ATTRIBUTES if a in self.attributes)
        object.__setattr__(self, "attributes", canonical)

    @classmethod
    def parse(cls, spec: str) -> DicomPatientRule:
        """``"IssuerOfPatientID+PatientID"`` -> the rule (spaces around names ignored)."""
        return cls(tuple(part.strip() for part in spec.split("+")))

    @property
    def spec(self) -> str:
        return "+".join(self.attributes)

    @property
    def ids(self) -> tuple[str, ...]:
        """The attributes that name someone (all but the issuer, which scopes them)."""
        return tuple(a for a in self.attributes if a not in _QUALIFIERS)

    @property
    def basis(self) -> str:
        """``dicom-patient-id`` for the default rule, else ``dicom:`` + the rule."""
        return BASIS_DICOM_PATIENT_ID if self.attributes == ("PatientID",) else f"dicom:{self.spec}"

    def patient(self, values: Mapping[str, str], image_id: str) -> Patient:
        """The patient of an image whose header has ``values`` (attribute -> text, the
        empty ones left out); the image itself when its named ids are all empty."""
        ids = [_canonical(a, values.get(a, "")) for a in self.attributes]
        if not any(_canonical(a, values.get(a, "")) for a in self.ids):
            return image_patient(image_id)
        raw = ids[0] if len(ids) == 1 else json.dumps(ids, ensure_ascii=False)
        return Patient(f"dicom:{self.spec}", raw, self.basis)


def _canonical(attribute: str, value: str) -> str:
    """A header value as keyed: stripped; OtherPatientIDs' values sorted and deduplicated."""
    if attribute == "OtherPatientIDs":
        return "\\".join(sorted({v.strip() for v in value.split("\\")} - {""}))
    return value.strip()


@dataclass(frozen=True)
class PatientSecret:
    """The secret of the keyed hash, and where it came from (for messages; never the value)."""

    value: str = field(repr=False)
    origin: str
    created: bool = False

    def key(self, patient: Patient) -> str:
        """The patient's ``patient_key``."""
        msg = f"{patient.namespace}:{patient.raw_id.strip()}".encode()
        return hmac.new(self.value.encode(), msg, hashlib.sha256).hexdigest()[:20]

    @property
    def check(self) -> str:
        """A check value stored with the dataset: says whether a secret is the dataset's
        without revealing it."""
        msg = b"pneumo:secret-check"
        return hmac.new(self.value.encode(), msg, hashlib.sha256).hexdigest()[:16]


def default_secret_path(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CONFIG_HOME/pneumo/patient-key``, by default ``~/.config/pneumo/patient-key``."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base).expanduser() / "pneumo" / SECRET_FILE


def resolve_secret(
    key_file: Path | None = None, environ: Mapping[str, str] | None = None
) -> PatientSecret:
    """The patient secret: ``key_file``, else ``$PNEUMO_PATIENT_KEY``, else the user's own
    random secret, created once (mode 600) in the config folder, never beside the data.

    Raises:
        ConfigError: the secret is empty, too short, or its file cannot be read.
    """
    env = os.environ if environ is None else environ
    if key_file is not None:
        return PatientSecret(_read_secret(Path(key_file)), f"key file {key_file}")
    if env.get(SECRET_ENV):
        return PatientSecret(_checked(env[SECRET_ENV], SECRET_ENV), SECRET_ENV)
    path = default_secret_path(env)
    if not path.exists():
        return _create_secret(path)
    if path.stat().st_mode & 0o077:
        log.warning("%s is readable by other users: chmod 600 it", path)
    return PatientSecret(_read_secret(path), str(path))


def _create_secret(path: Path) -> PatientSecret:
    value = secrets.token_hex(32)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process created it first: use theirs
        return PatientSecret(_read_secret(path), str(path))
    except OSError as e:
        raise ConfigError(
            f"cannot create the patient secret {path} ({e.strerror}): set {SECRET_ENV} "
            "or give --patient-key-file"
        ) from e
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    log.warning(
        "created a random patient secret at %s (mode 600); keep it (later batches of your "
        "datasets need the same one) and never store it beside the data",
        path,
    )
    return PatientSecret(value, str(path), created=True)


def _read_secret(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the patient secret file {path}: {e}") from e
    return _checked(text.strip(), str(path))


def _checked(value: str, origin: str) -> str:
    if len(value) < MIN_SECRET_CHARS:
        raise ConfigError(
            f"the patient secret in {origin} has {len(value)} characters: use at least "
            f"{MIN_SECRET_CHARS} random ones (python -c 'import secrets; "
            "print(secrets.token_hex(32))')"
        )
    return value


def check_fractions(fractions: tuple[float, ...]) -> None:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ConfigError(f"split fractions {fractions}: need 3 non-negative numbers summing to 1")


@dataclass(frozen=True, kw_only=True)
class SplitPolicy:
    """How a dataset assigns patients to train/val/test; fixed by its first batch.

    Attributes:
        fractions: train, val, test shares for patients the lists do not place.
        forced_test: patient keys forced into test (any image of theirs listed for test).
        test_from_lists: official lists were given: the test split is exactly
            ``forced_test``; every other patient is train or val.
        secret_check: :attr:`PatientSecret.check` of the dataset's secret.
        lists: ``name sha256`` of the list files behind ``forced_test``.
    """

    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
    forced_test: frozenset[str] = frozenset()
    test_from_lists: bool = False
    secret_check: str | None = None
    lists: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_fractions(self.fractions)

    def split(self, patient_key: str) -> str:
        """The patient's split: a pure function of the key and this policy."""
        if patient_key in self.forced_test:
            return "test"
        train, val, test = self.fractions
        if self.test_from_lists:  # the lists decide test: share the rest as train/val
            if train + val == 0:
                return "test"
            train, val, test = train / (train + val), val / (train + val), 0.0
        u = int(hashlib.sha256(f"split:{patient_key}".encode()).hexdigest()[:12], 16) / 16**12
        if u < test:
            return "test"
        return "val" if u < test + val else "train"

    def with_test(self, keys: Iterable[str]) -> SplitPolicy:
        return replace(self, forced_test=self.forced_test | frozenset(keys))

    def to_json(self) -> dict[str, Any]:
        return {
            "fractions": list(self.fractions),
            "forced_test": sorted(self.forced_test),
            "test_from_lists": self.test_from_lists,
            "secret_check": self.secret_check,
            "lists": list(self.lists),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SplitPolicy:
        return cls(
            fractions=tuple(data["fractions"]),  # type: ignore[arg-type]
            forced_test=frozenset(data.get("forced_test", ())),
            test_from_lists=bool(data.get("test_from_lists", False)),
            secret_check=data.get("secret_check"),
            lists=tuple(data.get("lists", ())),
        )

    def fingerprint(self) -> str:
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True, kw_only=True)
class BatchPolicy:
    """The policy a batch splits with, and what the batch must record.

    Attributes:
        policy: the dataset's policy (this batch's own when it is the first).
        extra_test: forced-test patients of this batch's lists that the dataset's policy
            lacks: test in this batch only (committed patients keep their split).
        write: the settings must be written at commit (first batch, or an older dataset
            without a secret check value).
    """

    policy: SplitPolicy
    extra_test: frozenset[str] = frozenset()
    write: bool = False

    @property
    def effective(self) -> SplitPolicy:
        return self.policy.with_test(self.extra_test) if self.extra_test else self.policy


def batch_policy(store: Store, wanted: SplitPolicy, fractions_given: bool) -> BatchPolicy:
    """The split policy for a new batch whose own lists and options give ``wanted``.

    The dataset's first batch fixes the policy: it creates ``_pneumo.json`` with a
    conditional put before reading any file, so of first batches started at once exactly
    one policy is written and the others adopt it (or refuse, when they asked for other
    fractions or use another secret).

    Raises:
        ConfigError: other split fractions or another secret than the dataset's.
    """
    settings = manifest.read_settings(store)
    if settings is None:
        first = {"schema_version": layout.SCHEMA_VERSION, "split_policy": wanted.to_json()}
        if manifest.create_settings(store, first):
            return BatchPolicy(policy=wanted)
        settings = manifest.read_settings(store)  # another first batch won the race
        assert settings is not None
    stored = policy_of(settings)
    if fractions_given and any(
        abs(a - b) > 1e-9 for a, b in zip(wanted.fractions, stored.fractions, strict=True)
    ):
        raise ConfigError(
            f"this dataset's split fractions are fixed at {stored.fractions} by its first "
            "batch; drop --split-fractions or use a new dataset"
        )
    write = False
    if stored.secret_check is None:  # made by an older pneumo: adopt this secret
        log.warning("this dataset has no patient-secret check value yet: recording yours")
        stored, write = replace(stored, secret_check=wanted.secret_check), True
    elif stored.secret_check != wanted.secret_check:
        raise ConfigError(
            f"this dataset's patient keys were made with another secret (check value "
            f"{stored.secret_check}, yours {wanted.secret_check}): use the dataset's secret "
            f"({SECRET_ENV} or --patient-key-file)"
        )
    extra = wanted.forced_test - stored.forced_test
    if extra:
        log.warning(
            "%d patients listed for test by this batch are not in the dataset's forced-test "
            "set (fixed by its first batch): test in this batch only",
            len(extra),
        )
    return BatchPolicy(policy=stored, extra_test=frozenset(extra), write=write)


def policy_of(settings: Mapping[str, Any]) -> SplitPolicy:
    """The policy in ``_pneumo.json`` (schema 1 kept only ``split_fractions``)."""
    if "split_policy" in settings:
        return SplitPolicy.from_json(settings["split_policy"])
    return SplitPolicy(fractions=tuple(settings["split_fractions"]))  # type: ignore[arg-type]


def committed_splits(rows: Iterable[dict[str, Any]], policy: SplitPolicy) -> dict[str, str]:
    """patient_key -> split of the committed rows (all datasets). A patient found in two
    splits (a dataset written before splits were per patient) keeps the policy's split if it
    is one of them, else the most held-out one; ``pneumo audit`` shows such patients."""
    found: dict[str, set[str]] = {}
    for r in rows:
        if r["patient_key"] is not None:
            found.setdefault(r["patient_key"], set()).add(r["split"])
    out = {}
    mixed = 0
    for patient, splits in found.items():
        if len(splits) == 1:
            out[patient] = next(iter(splits))
            continue
        mixed += 1
        wanted = policy.split(patient)
        out[patient] = (
            wanted if wanted in splits else next(s for s in _HELD_OUT_FIRST if s in splits)
        )
    if mixed:
        log.warning("%d committed patients are in more than one split: see pneumo audit", mixed)
    return out
