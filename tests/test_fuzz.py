"""Fuzzing bad input: params and malformed shard samples give a clear error or a counted skip,
never a traceback from deep inside a library."""

from __future__ import annotations

import io
import tarfile

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from clipshift.config import SECTIONS, load_params
from clipshift.data.shards import ReadStats, iter_shard
from clipshift.errors import ConfigError
from tests.tiny import full_params

SECTION_KEYS = {name: list(model.model_fields) for name, model in SECTIONS.items()}
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.lists(st.integers(-5, 5), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


@st.composite
def params_documents(draw):
    section = draw(st.sampled_from(sorted(SECTION_KEYS)))
    keys = SECTION_KEYS[section] + ["not_a_key"]
    values = draw(st.dictionaries(st.sampled_from(keys), scalars, min_size=1, max_size=3))
    return {section: values}


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(doc=params_documents())
def test_any_params_document_is_accepted_or_rejected_clearly(tmp_path, doc):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(full_params(doc)))  # the fuzzed keys in a complete file
    try:
        load_params(path)
    except ConfigError as err:
        text = str(err)
        assert text.startswith("invalid configuration") or "params file" in text
        section = next(iter(doc))
        assert section in text  # the message names the offending key


def _png(size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


members = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c"]),
        st.sampled_from(["png", "jpg", "txt", "json", "cls", "webp", "exe"]),
        st.one_of(st.binary(max_size=64), st.just(_png()), st.text(max_size=3000).map(str.encode)),
    ),
    max_size=8,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(parts=members)
def test_malformed_samples_are_skipped_and_counted(tmp_path, parts):
    path = tmp_path / "shard.tar"
    with tarfile.open(path, "w") as tar:
        for key, ext, payload in parts:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    stats = ReadStats()
    samples = list(iter_shard(path, stats))
    keys = {k for k, _, _ in parts}
    assert stats.read == len(samples)
    assert stats.read + stats.skipped <= max(len(keys), 1) + len(parts)
    for sample in samples:
        assert sample["image"].size[0] > 0
