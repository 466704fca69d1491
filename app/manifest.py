"""The model-store contract in code: ``manifest.json`` of one ``<store>/<name>/<version>/``
directory (DESIGN.md), the rules for model names and versions, the graph names and signatures,
and the tolerances the exporter and the service agree on.

The exporter (``training/export.py``) builds a `Manifest` and validates it before it moves a
version into place; the service (``app/store.py``) and ``training/evaluate.py`` read one with
`load_manifest`. So a manifest the exporter writes is one the service accepts. Pure pydantic:
no onnxruntime, no torch."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal, Self, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MANIFEST_FILE = "manifest.json"

# A model name is lower-case words of letters and digits joined by single '-' ("ptb-lm"); a
# version is a positive integer. Requests name a model as "name" or "name@version".
MODEL_NAME_MAX_CHARS = 64
MODEL_NAME_PATTERN = r"[a-z0-9]+(?:-[a-z0-9]+)*"
VERSION_PATTERN = r"[1-9][0-9]{0,8}"
MODEL_SPEC_PATTERN = rf"^{MODEL_NAME_PATTERN}(?:@{VERSION_PATTERN})?$"
_MODEL_NAME = re.compile(MODEL_NAME_PATTERN)
_VERSION = re.compile(VERSION_PATTERN)

Task = Literal["language-model", "sentiment"]
Precision = Literal["float32", "int8"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)

# Graph names: "full" (every position), "last" (language models: the final position only), and
# each one's int8 twin, "<name>-int8".
FULL, LAST = "full", "last"
INT8_SUFFIX = "-int8"
GRAPH_FILES = {FULL: "model.onnx", LAST: "last.onnx", FULL + INT8_SUFFIX: "model.int8.onnx",
               LAST + INT8_SUFFIX: "last.int8.onnx"}

# Largest |onnxruntime - PyTorch| the exporter accepts, and the self-test's tolerance at load.
PARITY_TOLERANCE = 1e-4
SELFTEST_TOLERANCE = 1e-4

# Input and output names of each task's graphs, with their dimensions (a name is a dimension the
# manifest resolves to a number or leaves symbolic: "batch" and "seq" are always dynamic).
SIGNATURES: dict[Task, dict[str, dict[str, dict[str, list[str]]]]] = {
    "language-model": {
        FULL: {
            "inputs": {"tokens": ["batch", "seq"], "h0": ["layers", "batch", "hidden"],
                       "c0": ["layers", "batch", "hidden"]},
            "outputs": {"log_probs": ["batch", "seq", "vocab"], "hn": ["layers", "batch", "hidden"],
                        "cn": ["layers", "batch", "hidden"]},
        },
        LAST: {
            "inputs": {"tokens": ["batch", "seq"], "h0": ["layers", "batch", "hidden"],
                       "c0": ["layers", "batch", "hidden"]},
            "outputs": {"log_probs": ["batch", "vocab"], "hn": ["layers", "batch", "hidden"],
                        "cn": ["layers", "batch", "hidden"]},
        },
    },
    "sentiment": {
        FULL: {
            "inputs": {"tokens": ["batch", "seq"], "lengths": ["batch"]},
            "outputs": {"probs": ["batch", "classes"]},
        },
    },
}
INTEGER_TENSORS = frozenset({"tokens", "lengths"})  # int64; every other tensor is float32


def graph_name(base: str, precision: Precision) -> str:
    """The manifest's name for ``base`` ("full", "last") at ``precision``: "full" or "full-int8"."""
    return base if precision == "float32" else f"{base}-{precision}"


def base_graph(name: str) -> str:
    """The float graph a graph name belongs to: "full-int8" -> "full"."""
    return name.removesuffix(INT8_SUFFIX)


def is_model_name(name: str) -> bool:
    return len(name) <= MODEL_NAME_MAX_CHARS and _MODEL_NAME.fullmatch(name) is not None


def is_version(text: str) -> bool:
    return _VERSION.fullmatch(text) is not None


class ManifestError(ValueError):
    """A manifest is missing, unreadable or breaks the contract. The message names files relative
    to the version directory, never an absolute path."""


class _Part(BaseModel):
    # Unknown keys are kept, so a newer exporter's additions survive a read and a write.
    model_config = ConfigDict(extra="allow", frozen=True)


class TensorSpec(_Part):
    dtype: Literal["int64", "float32"]
    shape: list[int | str]


# How an int8 graph quantizes its activations: "fixed" scales (a row's answer is the same whatever
# rows share its call) or scales computed "per-call" from the whole call's values (the answer moves
# with the call's other rows; what exporters before fixed scales wrote, hence the default).
ActivationScales = Literal["fixed", "per-call"]


class GraphSpec(_Part):
    file: str
    precision: Precision = "float32"
    quantized_from: str | None = None  # int8 graphs: the float graph they were quantized from
    activation_scales: ActivationScales | None = None  # int8 graphs; None (float graphs, old int8 ones)

    @property
    def deterministic(self) -> bool:
        """Whether a row's outputs are independent of the other rows of its call."""
        return self.precision == "float32" or self.activation_scales == "fixed"
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]


class SpecialToken(_Part):
    token: str
    id: int = Field(ge=0)


class TokenizerSpec(_Part):
    normaliser: str  # an id of app.text.NORMALISERS
    vocab_file: str
    vocab_size: int = Field(ge=1)
    special_tokens: dict[str, SpecialToken | None] = Field(default_factory=dict)


class FileEntry(_Part):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class SelfTestCheck(_Part):
    output: str
    index: list[int]
    value: float


class SelfTestCase(_Part):
    graph: str
    inputs: dict[str, list[Any]]  # missing h0/c0 mean the zero state
    checks: list[SelfTestCheck] = Field(min_length=1)


class SelfTest(_Part):
    tolerance: float = SELFTEST_TOLERANCE
    cases: list[SelfTestCase] = Field(min_length=1)


class Manifest(_Part):
    """``manifest.json`` of one model version. The validators enforce what ties its parts
    together: a ``full`` graph, graph signatures of the task, every referenced file listed with a
    checksum, labels for a classifier."""

    name: str = Field(pattern=f"^{MODEL_NAME_PATTERN}$", max_length=MODEL_NAME_MAX_CHARS)
    version: int = Field(ge=1)
    task: Task
    created: str  # ISO 8601
    description: str = ""
    files: dict[str, FileEntry]
    graphs: dict[str, GraphSpec]
    tokenizer: TokenizerSpec
    labels: list[str] | None = None
    architecture: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    conventions: dict[str, Any] = Field(default_factory=dict)
    parity: dict[str, Any] = Field(default_factory=dict)
    selftest: SelfTest

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        signatures = SIGNATURES[self.task]
        for filename in self.files:
            if Path(filename).name != filename or filename in ("", ".", ".."):
                raise ValueError(f"files lists {filename[:64]!r}, which is not a plain file name")
        if FULL not in self.graphs:
            raise ValueError("lists no 'full' graph")
        for name, graph in self.graphs.items():
            base = base_graph(name)
            if base not in signatures or graph_name(base, graph.precision) != name:
                raise ValueError(f"graph {name!r} is not a {self.task} graph name ({', '.join(signatures)}, "
                                 f"with '{INT8_SUFFIX}' for int8)")
            expected = signatures[base]
            if set(graph.inputs) != set(expected["inputs"]) or set(graph.outputs) != set(expected["outputs"]):
                raise ValueError(f"graph {name!r} does not have the {self.task} signature")
        for referenced in [self.tokenizer.vocab_file, *(g.file for g in self.graphs.values())]:
            if referenced not in self.files:
                raise ValueError(f"{referenced} is not in the checksum table")
        for case in self.selftest.cases:
            if case.graph not in self.graphs:
                raise ValueError(f"a self-test case names graph {case.graph!r}, which is not listed")
        if self.task == "sentiment" and not self.labels:
            raise ValueError("a sentiment model needs labels")
        return self

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2) + "\n"

    def write(self, version_dir: Path) -> None:
        (version_dir / MANIFEST_FILE).write_text(self.to_json(), encoding="utf-8")


def parse_manifest(raw: Any) -> Manifest:
    """A `Manifest` from parsed JSON; `ManifestError` naming the offending keys otherwise."""
    try:
        return Manifest.model_validate(raw)
    except ValidationError as e:
        problems = []
        for error in e.errors():
            where = ".".join(str(p) for p in error["loc"])
            problems.append(f"{where}: {error['msg']}" if where else error["msg"].removeprefix("Value error, "))
        raise ManifestError(f"{MANIFEST_FILE} breaks the contract: {'; '.join(sorted(set(problems))[:10])}") from None


def load_manifest(version_dir: Path) -> Manifest:
    """Read and validate ``version_dir/manifest.json``."""
    try:
        raw = json.loads((version_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{MANIFEST_FILE} is missing") from None
    except (OSError, ValueError) as e:
        raise ManifestError(f"{MANIFEST_FILE} is not readable JSON ({type(e).__name__})") from None
    return parse_manifest(raw)
