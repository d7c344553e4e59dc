"""Fetching from a PACS over DICOMweb: allow-listed roots only, bounded in time, bytes and concurrency.

``parse_source`` checks a ``dicom_source`` URL against the operator's allow-list (``MEDGEMMA_DICOMWEB_URLS``)
before anything is sent; ``Connection`` is one request's link to one DICOMweb root, built on the maintained
``dicomweb-client`` package: QIDO-RS lists a series' instances with exactly the attributes selection and ordering
need, WADO-RS retrieves the chosen instances (in their stored transfer syntax), and ``wsidicom`` reads slide tiles
through the same connection.

What every fetch of a request shares, and why:

* **the credential** (``access_credential``) goes into that connection's ``Authorization: Bearer`` header only;
  it is never logged, never echoed and never sent anywhere else: redirects are refused (a redirect could carry it
  to another host), environment proxies and ``.netrc`` are ignored;
* **connect and read timeouts** (``MEDGEMMA_DICOMWEB_CONNECT_TIMEOUT_S``, ``..._READ_TIMEOUT_S``), and no
  retries, so an unreachable PACS is a 502/504 within the timeout rather than after a backoff;
* **a byte budget** per request (``MEDGEMMA_DICOMWEB_MAX_BYTES``) and per answer (``MEDGEMMA_MAX_IMAGE_BYTES``),
  counted while the body streams in, so an oversized series is refused (413) before it is in memory.

Errors name the request field and the upstream status, never the URL: its path holds UIDs.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import urllib.parse
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset

from medgemma.errors import (
    BadGateway,
    BadRequest,
    Forbidden,
    GatewayTimeout,
    NotFound,
    PayloadTooLarge,
    ServiceError,
    UnsupportedMediaType,
)

logger = logging.getLogger(__name__)

# Their debug and info lines carry request URLs, whose paths are study/series/instance UIDs.
for _name in ("dicomweb_client", "urllib3", "wsidicom"):
    logging.getLogger(_name).setLevel(logging.WARNING)

_UID = r"[0-9]{1,64}(?:\.[0-9]{1,64}){0,63}"
_PATH_RE = re.compile(rf"/studies/({_UID})/series/({_UID})(?:/instances/({_UID}))?/?")
#: Attributes QIDO must return for selection, ordering and the image check (Orthanc omits most unless asked).
QIDO_FIELDS = (
    "00080008",  # ImageType
    "00080016",  # SOPClassUID
    "00080018",  # SOPInstanceUID
    "00080060",  # Modality
    "00200012",  # AcquisitionNumber
    "00200013",  # InstanceNumber
    "00200032",  # ImagePositionPatient
    "00200037",  # ImageOrientationPatient
    "00280008",  # NumberOfFrames
    "00280010",  # Rows
    "00280011",  # Columns
)


@dataclass(frozen=True)
class DicomRef:
    """A parsed ``dicom_source``: the allow-listed root it lives under and the UIDs it names."""

    root: str
    study: str
    series: str
    instance: str | None = None


def normalise_root(url: str) -> str:
    """``HTTP://Host:80/dicom-web/`` -> ``http://host/dicom-web``: how roots and sources are compared."""
    parts = urllib.parse.urlsplit(url.strip())
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    port = parts.port
    default = {"http": 80, "https": 443}.get(scheme)
    netloc = host if port in (None, default) else f"{host}:{port}"
    if ":" in host:  # IPv6 literal
        netloc = f"[{host}]" if port in (None, default) else f"[{host}]:{port}"
    return f"{scheme}://{netloc}{parts.path.rstrip('/')}"


def parse_source(url: Any, allowed: tuple[str, ...], param: str) -> DicomRef:
    """Check ``url`` names a series or an instance under an allow-listed root; 400 (never echoing it) if not."""
    if not isinstance(url, str) or not url.strip():
        raise BadRequest(f"'{param}' must be a DICOMweb URL", param=param)
    try:
        parts = urllib.parse.urlsplit(url.strip())
        _ = parts.port  # raises on a malformed port
    except ValueError:
        raise BadRequest(f"'{param}' is not a valid URL", param=param) from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise BadRequest(f"'{param}' must be an http(s) DICOMweb URL", param=param)
    if parts.username or parts.password:
        raise BadRequest(f"'{param}' must not carry credentials; use access_credential", param=param)
    if parts.query or parts.fragment:
        raise BadRequest(f"'{param}' must not have a query or a fragment", param=param)
    marker = parts.path.find("/studies/")
    match = _PATH_RE.fullmatch(parts.path[marker:]) if marker >= 0 else None
    if match is None:
        raise BadRequest(
            f"'{param}' must name a series or an instance: <DICOMweb root>/studies/<UID>/series/<UID>"
            "[/instances/<UID>]",
            param=param,
        )
    root = normalise_root(urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path[:marker], "", "")))
    if root not in {normalise_root(r) for r in allowed}:
        hint = "none is allow-listed on this server" if not allowed else "its root is not on the allow-list"
        raise BadRequest(
            f"'{param}': this server fetches DICOMweb sources only from roots in MEDGEMMA_DICOMWEB_URLS, and {hint}",
            param=param,
        )
    return DicomRef(root=root, study=match.group(1), series=match.group(2), instance=match.group(3))


class ByteBudget:
    """Bytes fetched for one request, across all its connections and threads."""

    def __init__(self, total: int, per_answer: int) -> None:
        self.total = total
        self.per_answer = per_answer
        self.used = 0
        self._lock = threading.Lock()

    def take(self, n: int, param: str) -> None:
        with self._lock:
            self.used += n
            used = self.used
        if used > self.total:
            raise PayloadTooLarge(
                f"'{param}': the DICOMweb sources of this request are over this server's limit of "
                f"{self.total:,} bytes (MEDGEMMA_DICOMWEB_MAX_BYTES)",
                param=param,
            )


class _CountingRaw:
    """Wraps a urllib3 response body: counts bytes against the budget while they stream in."""

    def __init__(self, raw: Any, budget: ByteBudget, param: str) -> None:
        self._raw = raw
        self._budget = budget
        self._param = param
        self._seen = 0

    def _count(self, n: int) -> None:
        self._seen += n
        if self._seen > self._budget.per_answer:
            raise PayloadTooLarge(
                f"'{self._param}': a DICOMweb object is over the limit of {self._budget.per_answer:,} "
                "bytes per image (MEDGEMMA_MAX_IMAGE_BYTES)",
                param=self._param,
            )
        self._budget.take(n, self._param)

    def stream(self, amt: int | None = None, decode_content: bool | None = None) -> Iterator[bytes]:
        for chunk in self._raw.stream(amt, decode_content=decode_content):
            self._count(len(chunk))
            yield chunk

    def read(self, *args: Any, **kwargs: Any) -> bytes:
        data = self._raw.read(*args, **kwargs)
        self._count(len(data))
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


class Connection:
    """One request's link to one DICOMweb root: credential, timeouts, byte budget, no redirects, no retries."""

    def __init__(
        self,
        root: str,
        *,
        credential: str | None,
        budget: ByteBudget,
        connect_timeout: float,
        read_timeout: float,
        concurrency: int,
        param: str,
    ) -> None:
        import requests
        from dicomweb_client import DICOMwebClient

        self.param = param
        self.budget = budget
        session = requests.Session()
        session.trust_env = False  # no environment proxies or .netrc: the allow-list says where requests go
        session.max_redirects = 0  # a redirect is refused: it could carry the credential to another host
        adapter = requests.adapters.HTTPAdapter(pool_maxsize=max(concurrency, 1) + 2, max_retries=0)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        session.hooks["response"].append(self._on_response)
        headers = {"Authorization": f"Bearer {credential}"} if credential else None
        self._session = session
        self.client = DICOMwebClient(root, session=session, headers=headers, timeout=(connect_timeout, read_timeout))
        self.client.set_http_retry_params(retry=False)
        self.timeouts = (connect_timeout, read_timeout)

    def _on_response(self, response: Any, *args: Any, **kwargs: Any) -> Any:
        length = response.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > self.budget.per_answer:
            response.close()
            _CountingRaw(None, self.budget, self.param)._count(int(length))  # raises the 413
        response.raw = _CountingRaw(response.raw, self.budget, self.param)
        return response

    def close(self) -> None:
        self._session.close()

    # -- QIDO / WADO ----------------------------------------------------------------------------------------------
    def search_instances(self, ref: DicomRef) -> list[Dataset]:
        """QIDO-RS: the series' instances (or the one instance) with :data:`QIDO_FIELDS`."""
        filters = {"SOPInstanceUID": ref.instance} if ref.instance else None
        with self.errors("searching the series"):
            found = self.client.search_for_instances(
                study_instance_uid=ref.study,
                series_instance_uid=ref.series,
                fields=list(QIDO_FIELDS),
                search_filters=filters,
                get_remaining=True,
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # bulk-data URIs in QIDO answers: not needed here
                return [Dataset.from_json(item) for item in found]

    def retrieve(self, ref: DicomRef, instance: str) -> Dataset:
        """WADO-RS: one instance in its stored transfer syntax (no transcoding on the PACS)."""
        with self.errors("retrieving an instance"):
            return self.client.retrieve_instance(
                ref.study, ref.series, instance, media_types=(("application/dicom", "*"),)
            )

    def open_slide(self, ref: DicomRef) -> Any:
        """A ``wsidicom`` slide reading tiles on demand through this connection."""
        from wsidicom import WsiDicom, WsiDicomWebClient

        with self.errors("opening the slide"):
            return WsiDicom.open_web(WsiDicomWebClient(self.client), ref.study, ref.series)

    @contextlib.contextmanager
    def errors(self, doing: str) -> Iterator[None]:
        """Upstream failures as this service's errors: 403/404/413/415/502/504, each saying what happened."""
        import requests

        param = self.param
        connect, read = self.timeouts
        try:
            yield
        except ServiceError:
            raise
        except requests.exceptions.ConnectTimeout:
            raise GatewayTimeout(
                f"'{param}': the DICOMweb server did not accept a connection within {connect:g} s", param=param
            ) from None
        except requests.exceptions.Timeout:
            raise GatewayTimeout(
                f"'{param}': the DICOMweb server did not answer within {read:g} s while {doing}", param=param
            ) from None
        except requests.exceptions.TooManyRedirects:
            raise BadGateway(
                f"'{param}': the DICOMweb server answered with a redirect, which this server does not follow",
                param=param,
            ) from None
        except requests.exceptions.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            raise _http_error(status, doing, param) from None
        except requests.exceptions.RequestException as exc:
            logger.info("DICOMweb request failed: %s", type(exc).__name__)
            raise BadGateway(
                f"'{param}': the DICOMweb server could not be reached while {doing}", param=param
            ) from None
        except Exception as exc:  # the client or wsidicom could not make sense of an answer
            status = _wraps_http_error(exc)
            if status:
                raise _http_error(status, doing, param) from None
            logger.info("DICOMweb answer rejected: %s", type(exc).__name__)
            raise BadGateway(
                f"'{param}': the DICOMweb server's answer could not be read while {doing}", param=param
            ) from None


def _wraps_http_error(exc: BaseException) -> int:
    """The upstream status when a library wrapped an HTTPError in its own exception (wsidicom's readers do)."""
    import requests

    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, requests.exceptions.HTTPError) and exc.response is not None:
            return int(exc.response.status_code)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
        seen += 1
    return 0


def _http_error(status: int, doing: str, param: str) -> ServiceError:
    upstream = {"upstream_status": status}
    if status in (401, 403):
        return Forbidden(
            f"'{param}': the DICOMweb server refused access (HTTP {status}) while {doing}; check access_credential",
            param=param,
            **upstream,
        )
    if status == 404:
        return NotFound(
            f"'{param}': the DICOMweb server has no such study, series or instance", param=param, **upstream
        )
    if status == 413:
        return PayloadTooLarge(
            f"'{param}': the DICOMweb server refused the request as too large", param=param, **upstream
        )
    if status in (406, 415):
        return UnsupportedMediaType(
            f"'{param}': the DICOMweb server cannot deliver the object in a form this server reads (HTTP {status})",
            param=param,
            **upstream,
        )
    if status in (408, 504):
        return GatewayTimeout(f"'{param}': the DICOMweb server timed out (HTTP {status}) while {doing}", param=param)
    return BadGateway(f"'{param}': the DICOMweb server answered HTTP {status} while {doing}", param=param, **upstream)
