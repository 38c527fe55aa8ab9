"""STOW-RS framing attacks through the secured facade (FACADE_AUTH=smart, real tokens from the test
issuer) in front of a real Orthanc: whatever multipart/related body a `patient/` token sends, the
PACS must end up holding exactly the instances the facade checked, and never another patient's.

Each body carries an instance of patient A (the token's patient) and an "intruder": an instance
with patient B's PatientID and StudyInstanceUID, framed so that a parser that is not strict per
RFC 2046 5.1.1 sees a different set of parts than Orthanc does. Orthanc is asked directly (REST
statistics and DICOMweb) what it holds afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from pydicom.dataset import FileDataset
from pydicom.uid import ImplicitVRLittleEndian, generate_uid

from fhir_facade.embedded import EmbeddedOrthanc, free_port, store_instances
from tests.auth.issuer import TestIssuer
from tests.conftest import outcome, serve
from tests.dicom_factory import CORPUS_ROOT, to_bytes
from tests.dicomweb_proxy.conftest import new_study, stow_body

PATIENT_A, PATIENT_B = "FRAME-A", "FRAME-B"
STORE_SCOPES = "launch/patient patient/ImagingStudy.crs"
REFERENCED_SOP_SEQUENCE = "00081199"
BOUNDARY = "BND"
DICOM_PART = b"Content-Type: application/dicom\r\n\r\n"


@dataclass
class SecuredStow:
    """The secured facade's DICOMweb root in front of the scratch Orthanc, with its token issuer."""

    root: str
    issuer: TestIssuer
    orthanc: EmbeddedOrthanc

    def token(self, patient: str = PATIENT_A, scope: str = STORE_SCOPES) -> dict[str, str]:
        return self.issuer.headers(scope, patient=patient)

    def post(self, body: bytes, content_type: str, path: str = "/studies") -> httpx.Response:
        headers = {**self.token(), "Accept": "application/dicom+json", "Content-Type": content_type}
        return httpx.post(f"{self.root}{path}", content=body, headers=headers, timeout=30)

    def instance_count(self) -> int:
        """How many instances Orthanc holds, asked through its own REST API."""
        return int(httpx.get(f"{self.orthanc.url}/statistics", timeout=30).json()["CountInstances"])

    def study_sops(self, study_uid: str) -> set[str]:
        response = httpx.get(f"{self.orthanc.dicomweb_url}/studies/{study_uid}/instances", timeout=30)
        if response.status_code == 204 or not response.content:
            return set()
        assert response.status_code == 200, response.text
        return {ds["00080018"]["Value"][0] for ds in response.json()}


@pytest.fixture(scope="module")
def secured_stow(scratch_orthanc: EmbeddedOrthanc) -> Iterator[SecuredStow]:
    port = free_port()
    issuer = TestIssuer(audience=f"http://127.0.0.1:{port}/fhir")
    try:
        with serve({**issuer.facade_settings, "dicomweb_url": scratch_orthanc.dicomweb_url}, port=port):
            yield SecuredStow(f"http://127.0.0.1:{port}/dicom-web", issuer, scratch_orthanc)
    finally:
        issuer.close()


@dataclass
class Scene:
    """Patient B's study (stored directly in Orthanc), and A's instance plus an intruder in B's study."""

    own: FileDataset
    intruder: FileDataset
    theirs_uid: str
    theirs_sops: set[str]


@pytest.fixture
def scene(secured_stow: SecuredStow) -> Scene:
    theirs = new_study(PATIENT_B)
    with httpx.Client(timeout=30) as client:
        store_instances(client, secured_stow.orthanc.url, theirs)
    theirs_uid = str(theirs[0].StudyInstanceUID)
    intruder = new_study(PATIENT_B, study_uid=theirs_uid)[0]
    # The factory derives series and SOP UIDs from the study's: the intruder gets its own, so that
    # storing it adds an instance to B's study instead of repeating one Orthanc already holds.
    intruder.SeriesInstanceUID = generate_uid(CORPUS_ROOT)
    intruder.SOPInstanceUID = intruder.file_meta.MediaStorageSOPInstanceUID = generate_uid(CORPUS_ROOT)
    own = new_study(PATIENT_A)[0]
    return Scene(own, intruder, theirs_uid, secured_stow.study_sops(theirs_uid))


def _content_type(*params: str) -> str:
    return "; ".join(["multipart/related", 'type="application/dicom"', *params])


def _referenced(response: httpx.Response) -> set[str]:
    items = response.json().get(REFERENCED_SOP_SEQUENCE, {}).get("Value", [])
    return {item["00081155"]["Value"][0] for item in items}


def test_preamble_without_crlf_cannot_smuggle_another_patients_instance(
    secured_stow: SecuredStow, scene: Scene
) -> None:
    """The probe that found the hole: `X--BND` is no delimiter for RFC 2046 (it must follow a CRLF
    or open the body), so a lax parser skips the intruder as preamble, while Orthanc stores it."""
    before = secured_stow.instance_count()
    body = (
        b"X--BND\r\n" + DICOM_PART + to_bytes(scene.intruder)
        + b"\r\n--BND\r\n" + DICOM_PART + to_bytes(scene.own)
        + b"\r\n--BND--\r\n"
    )  # fmt: skip
    response = secured_stow.post(body, _content_type(f"boundary={BOUNDARY}"))
    outcome(response, 400, "invalid")
    assert secured_stow.study_sops(scene.theirs_uid) == scene.theirs_sops
    assert secured_stow.instance_count() == before


def _framings(scene: Scene) -> dict[str, tuple[bytes, str]]:
    """Bodies whose parts depend on how strictly the multipart framing is read."""
    own, intruder = to_bytes(scene.own), to_bytes(scene.intruder)
    plain = _content_type(f"boundary={BOUNDARY}")
    return {
        # RFC 2046: the preamble ends at the first CRLF "--" boundary; a parser that finds "--BND"
        # anywhere takes the text before it as part of the delimiter line.
        "preamble with CRLF hiding a part": (
            b"preamble --BND\r\n" + DICOM_PART + intruder
            + b"\r\n--BND\r\n" + DICOM_PART + own + b"\r\n--BND--\r\n",
            plain,
        ),
        # A part whose Content-Length claims the delimiter and the intruder after it: the delimiter
        # ends the part whatever a part header says (RFC 2046 5.1.1, Content-Length is no MIME header).
        "boundary inside a part": (
            b"--BND\r\nContent-Type: application/dicom\r\nContent-Length: "
            + str(len(own) + len(b"\r\n--BND\r\n" + DICOM_PART) + len(intruder)).encode()
            + b"\r\n\r\n" + own + b"\r\n--BND\r\n" + DICOM_PART + intruder + b"\r\n--BND--\r\n",
            plain,
        ),
        "LF-only delimiters": (
            b"--BND\n" + DICOM_PART.replace(b"\r\n", b"\n") + own
            + b"\n--BND\n" + DICOM_PART.replace(b"\r\n", b"\n") + intruder + b"\n--BND--\n",
            plain,
        ),
        "LF-only delimiter after a CRLF one": (
            b"--BND\r\n" + DICOM_PART + own
            + b"\n--BND\n" + DICOM_PART.replace(b"\r\n", b"\n") + intruder + b"\r\n--BND--\r\n",
            plain,
        ),
        "two boundaries in Content-Type": (
            b"--BND\r\n" + DICOM_PART + own + b"\r\n--BND--\r\n"
            + b"--OTHER\r\n" + DICOM_PART + intruder + b"\r\n--OTHER--\r\n",
            _content_type("boundary=BND", "boundary=OTHER"),
        ),
        "transport padding after a delimiter": (
            b"--BND\r\n" + DICOM_PART + own
            + b"\r\n--BND   \r\n" + DICOM_PART + intruder + b"\r\n--BND--\r\n",
            plain,
        ),
        "epilogue holding a part": (
            b"--BND\r\n" + DICOM_PART + own + b"\r\n--BND--\r\n"
            + b"--BND\r\n" + DICOM_PART + intruder + b"\r\n--BND--\r\n",
            plain,
        ),
        "part without a Content-Type": (
            b"--BND\r\n" + DICOM_PART + own + b"\r\n--BND\r\n\r\n" + intruder + b"\r\n--BND--\r\n",
            plain,
        ),
        "nested multipart": (
            b"--BND\r\n" + DICOM_PART + own
            + b"\r\n--BND\r\nContent-Type: multipart/related; boundary=IN\r\n\r\n--IN\r\n" + DICOM_PART
            + intruder + b"\r\n--IN--\r\n\r\n--BND--\r\n",
            plain,
        ),
    }  # fmt: skip


FRAMINGS = [
    "preamble with CRLF hiding a part",
    "boundary inside a part",
    "LF-only delimiters",
    "LF-only delimiter after a CRLF one",
    "two boundaries in Content-Type",
    "transport padding after a delimiter",
    "epilogue holding a part",
    "part without a Content-Type",
    "nested multipart",
]


@pytest.mark.parametrize("framing", FRAMINGS)
def test_orthanc_holds_exactly_what_the_facade_checked(
    secured_stow: SecuredStow, scene: Scene, framing: str
) -> None:
    """Refused (400/403/415 OperationOutcome), or stored: and then Orthanc holds A's instance at
    most, never the intruder."""
    body, content_type = _framings(scene)[framing]
    before = secured_stow.instance_count()
    response = secured_stow.post(body, content_type)
    if response.status_code == 200:
        assert _referenced(response) <= {str(scene.own.SOPInstanceUID)}
        assert secured_stow.instance_count() == before + len(_referenced(response))
    else:
        assert response.status_code in (400, 403, 415), response.text
        outcome(response, response.status_code, response.json()["issue"][0]["code"])
        assert secured_stow.instance_count() == before
    assert secured_stow.study_sops(scene.theirs_uid) == scene.theirs_sops


def test_own_instances_are_stored(secured_stow: SecuredStow) -> None:
    study = new_study(PATIENT_A)
    study_uid = str(study[0].StudyInstanceUID)
    before = secured_stow.instance_count()
    body, content_type = stow_body(study)
    response = secured_stow.post(body, content_type, path=f"/studies/{study_uid}")
    assert response.status_code == 200, response.text
    sops = {str(ds.SOPInstanceUID) for ds in study}
    assert _referenced(response) == sops
    assert secured_stow.study_sops(study_uid) == sops
    assert secured_stow.instance_count() == before + 2


def test_refusal_does_not_name_the_other_patients_data(secured_stow: SecuredStow, scene: Scene) -> None:
    """An instance of A under B's study UID is refused by its index; B's UIDs are not echoed."""
    ds = scene.own
    ds.StudyInstanceUID = scene.theirs_uid
    body, content_type = stow_body([new_study(PATIENT_A)[0], ds])
    response = secured_stow.post(body, content_type)
    diagnostics = outcome(response, 403, "forbidden")["issue"][0]["diagnostics"]
    assert "instance 2" in diagnostics
    assert scene.theirs_uid not in diagnostics and PATIENT_B not in diagnostics
    for sop in scene.theirs_sops:
        assert sop not in diagnostics
    assert secured_stow.study_sops(scene.theirs_uid) == scene.theirs_sops


def _explicit_le(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    """One Explicit VR Little Endian data element with a 16-bit length (PS3.5 7.1.2)."""
    if len(value) % 2:
        value += b"\0" if vr == b"UI" else b" "
    return (
        group.to_bytes(2, "little")
        + element.to_bytes(2, "little")
        + vr
        + len(value).to_bytes(2, "little")
        + value
    )


@pytest.mark.parametrize("what", ["second PatientID", "IssuerOfPatientID", "StudyInstanceUID"])
def test_identity_after_the_pixel_data_is_refused(secured_stow: SecuredStow, scene: Scene, what: str) -> None:
    """An identifying element placed after the pixel data: a check that stops before the pixels
    misses it, and a toolkit that keeps another of two equal tags than the PACS's sees another
    patient. IssuerOfPatientID there would make the instance another patient's (PatientID within
    another issuer); StudyInstanceUID there (none before) would put it into B's study."""
    own = scene.own
    if what == "second PatientID":
        element = _explicit_le(0x0010, 0x0020, b"LO", PATIENT_B.encode())
    elif what == "IssuerOfPatientID":
        element = _explicit_le(0x0010, 0x0021, b"LO", b"OTHER-ISSUER")
    else:
        del own.StudyInstanceUID
        element = _explicit_le(0x0020, 0x000D, b"UI", scene.theirs_uid.encode())
    body = b"--BND\r\n" + DICOM_PART + to_bytes(own) + element + b"\r\n--BND--\r\n"
    before = secured_stow.instance_count()
    response = secured_stow.post(body, _content_type(f"boundary={BOUNDARY}"))
    assert "not in ascending order" in outcome(response, 400, "invalid")["issue"][0]["diagnostics"]
    assert secured_stow.instance_count() == before
    assert secured_stow.study_sops(scene.theirs_uid) == scene.theirs_sops


def test_dataset_in_another_vr_form_than_its_transfer_syntax_is_refused(
    secured_stow: SecuredStow, scene: Scene
) -> None:
    """File meta saying Explicit VR over an Implicit VR dataset: pydicom guesses and reads on, and
    a toolkit that guesses otherwise reads other values; such a file is refused."""
    own = scene.own
    explicit = to_bytes(own)
    own.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    implicit = to_bytes(own)

    def dataset_start(part10: bytes) -> int:  # preamble, "DICM", group length element, meta group
        return 132 + 12 + int.from_bytes(part10[140:144], "little")

    forged = explicit[: dataset_start(explicit)] + implicit[dataset_start(implicit) :]
    body = b"--BND\r\n" + DICOM_PART + forged + b"\r\n--BND--\r\n"
    before = secured_stow.instance_count()
    response = secured_stow.post(body, _content_type(f"boundary={BOUNDARY}"))
    assert (
        "not encoded as its transfer syntax says"
        in outcome(response, 400, "invalid")["issue"][0]["diagnostics"]
    )
    assert secured_stow.instance_count() == before


def _ambiguous(scene: Scene) -> dict[str, tuple[bytes, str, int, str]]:
    """Bodies and Content-Types refused outright: (body, Content-Type, status, issue code)."""
    own = to_bytes(scene.own)
    one = b"--BND\r\n" + DICOM_PART + own + b"\r\n--BND--\r\n"
    plain = _content_type(f"boundary={BOUNDARY}")
    return {
        "no parts": (b"--BND--\r\n", plain, 400, "invalid"),
        "no close-delimiter": (b"--BND\r\n" + DICOM_PART + own, plain, 400, "invalid"),
        "no boundary parameter": (one, _content_type(), 400, "invalid"),
        "an unknown parameter": (one, _content_type("boundary=BND", "start=<root>"), 400, "invalid"),
        "an unparsable parameter": (one, _content_type("boundary=BND", "junk"), 400, "invalid"),
        "a boundary of 71 characters": (one, _content_type("boundary=" + "B" * 71), 400, "invalid"),
        "another part type": (
            one,
            'multipart/related; type="application/dicom+json"; boundary=BND',
            415,
            "not-supported",
        ),
        "not multipart/related": (one, "multipart/mixed; boundary=BND", 415, "not-supported"),
        "a header line without a colon": (
            b"--BND\r\nContent-Type application/dicom\r\n\r\n" + own + b"\r\n--BND--\r\n",
            plain,
            400,
            "invalid",
        ),
        "a folded header": (
            b"--BND\r\nContent-Type:\r\n application/dicom\r\n\r\n" + own + b"\r\n--BND--\r\n",
            plain,
            400,
            "invalid",
        ),
        "Content-Type twice": (
            b"--BND\r\n" + b"Content-Type: application/dicom\r\n" + DICOM_PART + own + b"\r\n--BND--\r\n",
            plain,
            400,
            "invalid",
        ),
        "base64 content": (
            b"--BND\r\nContent-Transfer-Encoding: base64\r\n" + DICOM_PART + own + b"\r\n--BND--\r\n",
            plain,
            400,
            "invalid",
        ),
        "a JSON part": (
            b"--BND\r\nContent-Type: application/dicom+json\r\n\r\n{}\r\n--BND--\r\n",
            plain,
            415,
            "not-supported",
        ),
        "padding after the first delimiter": (
            b"--BND  \r\n" + DICOM_PART + own + b"\r\n--BND--\r\n",
            plain,
            400,
            "invalid",
        ),
    }


AMBIGUOUS = [
    "no parts",
    "no close-delimiter",
    "no boundary parameter",
    "an unknown parameter",
    "an unparsable parameter",
    "a boundary of 71 characters",
    "another part type",
    "not multipart/related",
    "a header line without a colon",
    "a folded header",
    "Content-Type twice",
    "base64 content",
    "a JSON part",
    "padding after the first delimiter",
]


@pytest.mark.parametrize("case", AMBIGUOUS)
def test_ambiguous_bodies_are_refused(secured_stow: SecuredStow, scene: Scene, case: str) -> None:
    body, content_type, status, code = _ambiguous(scene)[case]
    before = secured_stow.instance_count()
    outcome(secured_stow.post(body, content_type), status, code)
    assert secured_stow.instance_count() == before
