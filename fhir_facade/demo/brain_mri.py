"""The demo study: a real brain MRI (Colin27) turned into an axial T1 MR series.

Colin27 is the MNI single-subject template: 27 T1-weighted scans of one volunteer, registered and
averaged into a 1 mm isotropic volume in MNI space (Holmes CJ, Hoge R, Collins L, Woods R,
Toga AW, Evans AC. "Enhancement of MR images using registration for signal averaging."
J Comput Assist Tomogr 1998;22(2):324-333; https://www.bic.mni.mcgill.ca/ServicesAtlases/Colin27).
Debian's `mricron-data` package ships it as /usr/share/mricron/templates/ch2.nii.gz
(181x217x181, uint8, see /usr/share/doc/mricron-data/copyright), so the demo needs no download
and no patient data.

The NIfTI-1 reader is deliberately tiny (struct + numpy, no nibabel): it reads what this file
needs and refuses what it does not understand.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
from typing import NamedTuple

import httpx
import numpy as np
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    MRImageStorage,
)

from fhir_facade.embedded.orthanc import store_instances

__all__ = [
    "COLIN27_PATH",
    "DEMO_PATIENT_ID",
    "DEMO_SERIES_UID",
    "DEMO_STUDY_UID",
    "NiftiVolume",
    "build_axial_study",
    "build_demo_study",
    "load_colin27",
    "png_preview",
    "upload_demo",
]

COLIN27_PATH = Path("/usr/share/mricron/templates/ch2.nii.gz")
"""Where Debian's mricron-data installs the Colin27 T1 template."""

DEMO_STUDY_UID = "1.2.826.0.1.3680043.8.498.727.1"
"""Fixed StudyInstanceUID of the demo study, so uploads are idempotent and docs can link it."""
DEMO_SERIES_UID = f"{DEMO_STUDY_UID}.1"
_FRAME_OF_REFERENCE_UID = f"{DEMO_STUDY_UID}.99"
DEMO_PATIENT_ID = "DEMO-0001"

# MNI z range (mm) that holds the brain in Colin27: from the cerebellum to just below the vertex.
_BRAIN_Z_MM = (-45.0, 75.0)
# uint8 template values are scaled into 12 bits, the usual MR stored range.
_SCALE = 16

# NIfTI-1 datatype codes (nifti1.h, DT_*) -> numpy dtypes without byte order.
_NIFTI_DTYPES: dict[int, str] = {
    2: "u1",  # DT_UNSIGNED_CHAR
    4: "i2",  # DT_SIGNED_SHORT
    8: "i4",  # DT_SIGNED_INT
    16: "f4",  # DT_FLOAT
    64: "f8",  # DT_DOUBLE
    256: "i1",  # DT_INT8
    512: "u2",  # DT_UINT16
}


class NiftiVolume(NamedTuple):
    """A 3D volume indexed data[i, j, k] (NIfTI voxel order) and its voxel-to-RAS+ mm affine."""

    data: np.ndarray
    voxel_size: tuple[float, float, float]
    affine: np.ndarray


def load_colin27(path: Path = COLIN27_PATH) -> NiftiVolume:
    """Read a gzipped single-file NIfTI-1 (.nii.gz) volume with struct and numpy only.

    Header offsets (nifti1.h, 348 bytes): 0 sizeof_hdr int32 (=348, also tells the byte order);
    40 dim[8] int16; 70 datatype int16; 72 bitpix int16; 76 pixdim[8] float32; 108 vox_offset
    float32; 112 scl_slope, 116 scl_inter float32; 252 qform_code, 254 sform_code int16;
    280 srow_x/y/z[4] float32 (the sform affine, voxel -> RAS+ mm); 344 magic "n+1\\0".
    """
    raw = gzip.decompress(path.read_bytes())
    endian = "<" if struct.unpack_from("<i", raw, 0)[0] == 348 else ">"
    if struct.unpack_from(f"{endian}i", raw, 0)[0] != 348:
        raise ValueError(f"{path}: not a NIfTI-1 file (sizeof_hdr != 348)")
    if raw[344:348] != b"n+1\0":
        raise ValueError(f"{path}: magic {raw[344:348]!r}, expected single-file NIfTI-1 'n+1'")
    dim = struct.unpack_from(f"{endian}8h", raw, 40)
    if dim[0] < 3 or any(d > 1 for d in dim[4 : dim[0] + 1]):
        raise ValueError(f"{path}: expected a 3D volume, dim={dim}")
    datatype, bitpix = struct.unpack_from(f"{endian}2h", raw, 70)
    if datatype not in _NIFTI_DTYPES:
        raise ValueError(f"{path}: unsupported NIfTI datatype {datatype}")
    dtype = np.dtype(endian + _NIFTI_DTYPES[datatype])
    if dtype.itemsize * 8 != bitpix:
        raise ValueError(f"{path}: bitpix {bitpix} does not match datatype {datatype}")
    pixdim = struct.unpack_from(f"{endian}8f", raw, 76)
    (vox_offset,) = struct.unpack_from(f"{endian}f", raw, 108)
    scl_slope, scl_inter = struct.unpack_from(f"{endian}2f", raw, 112)
    _qform_code, sform_code = struct.unpack_from(f"{endian}2h", raw, 252)

    shape = (dim[1], dim[2], dim[3])
    count = shape[0] * shape[1] * shape[2]
    flat = np.frombuffer(raw, dtype=dtype, count=count, offset=int(vox_offset))
    # NIfTI stores i fastest (Fortran order): reshape reversed, then transpose to [i, j, k].
    data = flat.reshape(shape[::-1]).transpose(2, 1, 0)
    # scl_slope == 0 means "no scaling" (nifti1.h); ch2 has slope 1, intercept 0.
    if scl_slope not in (0.0, 1.0) or scl_inter != 0.0:
        data = data.astype(np.float32) * scl_slope + scl_inter

    voxel_size = (float(pixdim[1]), float(pixdim[2]), float(pixdim[3]))
    if sform_code > 0:
        rows = struct.unpack_from(f"{endian}12f", raw, 280)
        affine = np.vstack([np.array(rows, dtype=np.float64).reshape(3, 4), [0, 0, 0, 1]])
    else:
        # No sform: scale by voxel size around the volume centre (method 1 of nifti1.h).
        affine = np.diag([*voxel_size, 1.0])
        affine[:3, 3] = -np.array(voxel_size) * (np.array(shape) - 1) / 2
    return NiftiVolume(data=data, voxel_size=voxel_size, affine=affine)


def _axial_slices(volume: NiftiVolume, n_slices: int) -> list[int]:
    """k indices, evenly spaced by a whole number of voxels, centred on the brain's z range."""
    dz, z0 = volume.affine[2, 2], volume.affine[2, 3]
    k_lo, k_hi = sorted(int(np.rint((z - z0) / dz)) for z in _BRAIN_Z_MM)
    k_lo, k_hi = max(k_lo, 0), min(k_hi, volume.data.shape[2] - 1)
    if not 1 <= n_slices <= k_hi - k_lo + 1:
        raise ValueError(f"n_slices must be between 1 and {k_hi - k_lo + 1}, got {n_slices}")
    step = (k_hi - k_lo) // (n_slices - 1) if n_slices > 1 else 1
    start = k_lo + ((k_hi - k_lo) - step * (n_slices - 1)) // 2
    return [start + step * n for n in range(n_slices)]


def _radiological(volume: NiftiVolume, k: int) -> tuple[np.ndarray, list[float]]:
    """Slice k as a DICOM axial image (rows anterior->posterior, columns patient right->left).

    That is ImageOrientationPatient [1,0,0, 0,1,0] in DICOM LPS (PS3.3 C.7.6.2.1.1), the
    radiological view. NIfTI world is RAS+, so LPS x = -RAS x and LPS y = -RAS y.
    Returns the pixels and the LPS position of the first (top left) pixel.
    """
    affine = volume.affine
    if not np.allclose(affine[:3, :3], np.diag(np.diag(affine[:3, :3]))):
        raise ValueError("only axis-aligned (diagonal sform) volumes are supported")
    plane = volume.data[:, :, k].T  # [j, i]: rows along j, columns along i
    nj, ni = plane.shape
    # Columns must go towards patient left (-RAS x): flip i when it points right.
    flip_i = affine[0, 0] > 0
    # Rows must go towards posterior (-RAS y): flip j when it points anterior.
    flip_j = affine[1, 1] > 0
    if flip_i:
        plane = plane[:, ::-1]
    if flip_j:
        plane = plane[::-1, :]
    i0 = ni - 1 if flip_i else 0
    j0 = nj - 1 if flip_j else 0
    ras = affine @ np.array([i0, j0, k, 1.0])
    return np.ascontiguousarray(plane), [float(-ras[0]), float(-ras[1]), float(ras[2])]


def build_demo_study(n_slices: int = 24, volume: NiftiVolume | None = None) -> list[FileDataset]:
    """The demo study: one axial T1 MR series of `n_slices` slices through the Colin27 brain.

    Geometry is consistent (PixelSpacing, SliceThickness, SpacingBetweenSlices,
    ImagePositionPatient, ImageOrientationPatient, one FrameOfReferenceUID), so viewers stack
    and measure it correctly. All UIDs are fixed: building twice gives the same instances.
    """
    volume = load_colin27() if volume is None else volume
    return build_axial_study(_axial_slices(volume, n_slices), volume)


def build_axial_study(slices: list[int], volume: NiftiVolume | None = None) -> list[FileDataset]:
    """An axial series of the Colin27 volume's slices `slices` (k indices, ascending, evenly
    spaced), under the demo study's UIDs: e.g. `range(0, 181, 3)` for the whole axial range, from
    below the cerebellum to above the vertex (the applicability tests of ADR 0031)."""
    volume = load_colin27() if volume is None else volume
    if not slices or any(not 0 <= k < volume.data.shape[2] for k in slices):
        raise ValueError(f"slices must be k indices in [0, {volume.data.shape[2]})")
    dx, dy, dz = volume.voxel_size
    spacing = (slices[1] - slices[0]) * dz if len(slices) > 1 else dz
    datasets: list[FileDataset] = []
    for number, k in enumerate(slices, start=1):
        plane, position = _radiological(volume, k)
        pixels = (np.clip(plane, 0, None).astype(np.float64) * _SCALE).round().astype("<u2")
        sop_uid = UID(f"{DEMO_SERIES_UID}.{number}")

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = FileDataset(f"{sop_uid}.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop_uid
        # DERIVED: the template is a registered average, not one acquisition.
        ds.ImageType = ["DERIVED", "PRIMARY", "AXIAL"]

        ds.PatientName = "Demo^Colin"
        ds.PatientID = DEMO_PATIENT_ID
        ds.PatientSex = "M"
        ds.StudyInstanceUID = DEMO_STUDY_UID
        ds.StudyID = "1"
        ds.AccessionNumber = "DEMO-ACC-1"
        ds.StudyDate = "20240701"
        ds.StudyTime = "090000"
        ds.TimezoneOffsetFromUTC = "+0000"
        ds.StudyDescription = "MRI BRAIN demo (Colin27)"
        ds.ReferringPhysicianName = "Demo^Referrer"

        ds.Modality = "MR"
        ds.SeriesInstanceUID = DEMO_SERIES_UID
        ds.SeriesNumber = 1
        ds.SeriesDescription = "AX T1 (Colin27 template)"
        ds.SeriesDate = "20240701"
        ds.SeriesTime = "090500"
        ds.BodyPartExamined = "BRAIN"
        ds.Manufacturer = "MNI (Colin27 template)"
        ds.InstitutionName = "fhir-facade demo"

        # MR Image module (PS3.3 C.8.3.1): a plausible 3D spoiled gradient echo T1.
        ds.ScanningSequence = "GR"
        ds.SequenceVariant = "SP"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "3D"
        ds.RepetitionTime = 18.0
        ds.EchoTime = 10.0
        ds.FlipAngle = 30.0
        ds.MagneticFieldStrength = 1.5

        ds.FrameOfReferenceUID = _FRAME_OF_REFERENCE_UID
        ds.PositionReferenceIndicator = ""
        ds.InstanceNumber = number
        ds.ImagePositionPatient = position
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.SliceLocation = position[2]
        ds.PixelSpacing = [dy, dx]  # row spacing (along j), then column spacing (along i)
        ds.SliceThickness = dz
        ds.SpacingBetweenSlices = spacing

        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = pixels.shape
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.WindowCenter = 1400
        ds.WindowWidth = 2800
        ds.PixelData = pixels.tobytes()
        datasets.append(ds)
    return datasets


def png_preview(ds: Dataset) -> bytes:
    """An 8-bit grayscale PNG of one slice, windowed with its WindowCenter/Width.

    Written with zlib + struct (PNG spec, ISO/IEC 15948: IHDR, IDAT, IEND chunks) so a demo
    thumbnail needs no imaging library.
    """
    pixels = ds.pixel_array.astype(np.float64)
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    scaled = np.clip((pixels - (center - width / 2)) / width * 255.0, 0, 255).astype(np.uint8)
    height, row_len = scaled.shape
    # Each scanline starts with filter type 0 (None).
    scanlines = b"".join(b"\0" + scaled[r].tobytes() for r in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body))
            + kind
            + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", row_len, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(scanlines, 9))
        + chunk(b"IEND", b"")
    )


def upload_demo(
    orthanc_url: str,
    *,
    client: httpx.Client | None = None,
    n_slices: int = 24,
) -> str:
    """Store the demo study in Orthanc unless it is already complete; return its StudyInstanceUID.

    Uses Orthanc's REST API (`POST /tools/lookup` to find the study, `POST /instances` to
    store); Orthanc answers "AlreadyStored" for duplicates, so a partial earlier upload is
    simply completed. Pass `client` to reuse a session (e.g. one carrying credentials).
    """
    base = orthanc_url.rstrip("/")
    owned = client is None
    http = httpx.Client(timeout=30.0) if client is None else client
    try:
        if demo_stored(base, http) < n_slices:
            store_instances(http, base, build_demo_study(n_slices))
    finally:
        if owned:
            http.close()
    return DEMO_STUDY_UID


def demo_stored(orthanc_url: str, client: httpx.Client) -> int:
    """How many instances of the demo study Orthanc holds (0: none), by its REST API
    (`POST /tools/lookup`, `GET /studies/{id}/instances`)."""
    base = orthanc_url.rstrip("/")
    found = client.post(f"{base}/tools/lookup", content=DEMO_STUDY_UID)
    found.raise_for_status()
    for match in found.json():
        if match.get("Type") == "Study":
            instances = client.get(f"{base}/studies/{match['ID']}/instances")
            instances.raise_for_status()
            return len(instances.json())
    return 0
