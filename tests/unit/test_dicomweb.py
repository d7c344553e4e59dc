"""The DICOMweb client: the allow-list, and one request's connection against a real Orthanc (no mocks)."""

from __future__ import annotations

import pytest

from medgemma import dicomweb
from medgemma.errors import BadGateway, BadRequest, NotFound, PayloadTooLarge

ROOT = "https://pacs.example.org/dicom-web"
SERIES = "/studies/1.2.3/series/4.5.6"


@pytest.mark.parametrize(
    "url",
    [
        ROOT + SERIES,
        ROOT + SERIES + "/",
        "HTTPS://PACS.example.org:443/dicom-web" + SERIES,
        ROOT + SERIES + "/instances/7.8.9",
    ],
)
def test_allow_listed_sources(url):
    ref = dicomweb.parse_source(url, (ROOT + "/",), "p")
    assert (ref.root, ref.study, ref.series) == (ROOT, "1.2.3", "4.5.6")


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("https://pacs.example.org/other" + SERIES, "allow-list"),
        ("https://pacs.example.org.evil.test/dicom-web" + SERIES, "allow-list"),
        ("http://pacs.example.org/dicom-web" + SERIES, "allow-list"),  # another scheme is another root
        ("https://pacs.example.org:8443/dicom-web" + SERIES, "allow-list"),
        ("https://user:pw@pacs.example.org/dicom-web" + SERIES, "credentials"),
        (ROOT + SERIES + "?includefield=all", "query"),
        (ROOT + "/studies/1.2.3", "series"),
        (ROOT + "/studies/1.2.3/series/4.x", "series"),
        ("file:///etc/passwd", "http(s)"),
        ("", "DICOMweb URL"),
    ],
)
def test_refused_sources_never_echo_the_url(url, why):
    with pytest.raises(BadRequest) as err:
        dicomweb.parse_source(url, (ROOT,), "p")
    assert why in err.value.message
    assert "4.5.6" not in err.value.message and "evil" not in err.value.message


def test_nothing_allow_listed_says_so():
    with pytest.raises(BadRequest) as err:
        dicomweb.parse_source(ROOT + SERIES, (), "p")
    assert "none is allow-listed" in err.value.message


def connection(root: str, *, per_answer: int = 32 * 2**20, total: int = 2**30) -> dicomweb.Connection:
    return dicomweb.Connection(
        root,
        credential=None,
        budget=dicomweb.ByteBudget(total, per_answer),
        connect_timeout=2.0,
        read_timeout=5.0,
        concurrency=2,
        param="p",
    )


def test_against_orthanc_budget_redirects_and_missing_series(pacs):
    server, data = pacs
    ref = dicomweb.parse_source(data.ct_url, (data.root,), "p")
    conn = connection(data.root)
    found = conn.search_instances(ref)
    assert len(found) == 120 and all("ImagePositionPatient" in ds for ds in found)
    assert conn.budget.used > 0

    small = connection(data.root, per_answer=2000)  # every instance is larger than this
    with pytest.raises(PayloadTooLarge) as err:
        small.retrieve(ref, str(found[0].SOPInstanceUID))
    assert "MEDGEMMA_MAX_IMAGE_BYTES" in err.value.message

    with pytest.raises(NotFound):
        conn.retrieve(ref, "1.2.3.4.5")
    with pytest.raises(BadGateway) as err, conn.errors("testing"):
        conn._session.get(server.url + "/", timeout=5)  # Orthanc redirects / to its explorer: refused
    assert "redirect" in err.value.message
    conn.close()
    small.close()
