"""Stage 5: export a run for the wider ecosystem, as a PEFT adapter or a merged HF checkpoint.

Every method's trained update is a low-rank change ΔW = B' A' of the *original* weight W
(`AdapterLayer.lora_update`, the conversions of methods.md):
- lora, dora: B' = s·B, A' = A;
- pissa, milora: B' = s·[B, −B₀], A' = [A; A₀], rank 2r (their frozen base was W − s·B₀ A₀);
- loraxs, edora, lorasb: B' = s·B R, A' = A.
dora and edora also carry a magnitude m, which is PEFT's DoRA magnitude vector:
W' = (m / ‖W + B' A'‖_row) ⊙ (W + B' A').

`peft` writes B', A' (and m) as a PEFT LoRA/DoRA adapter with lora_alpha = its rank, so
PEFT's own scale is 1. `merged` writes W' for every target, one shard at a time. The W
it merges into is the original weight, or with base "dequantized" the weight the adapter
was trained against, W − (F − deq(Q(F))) with F the frozen part (see PEFT issue #2105).
"""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig
from rich.progress import track
from safetensors.torch import save_file

from . import quantize
from .config import parse_size
from .console import console
from .errors import QSVDError
from .export_gguf import (ARCHITECTURES, EXPORT_TYPES, GGUF_TYPES, LLAMA_CPP_TYPES, gguf_architecture, llama_cpp,
                          llama_quantize, modelfile, read_vocabulary, write_gguf)
from .files import check_output, check_writable, one_writer, publish, remove, temp_suffix
from .load import ModelFiles, empty_model, read_config, read_tokenizer
from .memory import group_by_size, return_freed_memory
from .methods import METHODS
from .run_dir import Run, read_run
from .devices import DTYPES
from .split import find_targets, trained_targets
from .upload import check_repo_id
from .upload import push_to_hub as upload
from .version import __version__
from .weights import open_weights

FORMATS = ("peft", "merged", "gguf")
BASES = ("original", "dequantized")
PEFT_WEIGHTS = "adapter_model.safetensors"
SHARD_SIZE = "1GB"  # merged: the default largest shard


@dataclass
class LoraUpdate:
    """One target's ΔW = B A on the original weight, with DoRA's magnitude m where there is one."""

    B: torch.Tensor
    A: torch.Tensor
    magnitude: torch.Tensor | None

    def merge(self, weight: torch.Tensor) -> torch.Tensor:
        """W + B A, rescaled row by row to m / ‖W + B A‖_row where there is a magnitude (fp32)."""
        merged = weight.float() + self.B @ self.A
        if self.magnitude is not None:
            merged *= (self.magnitude / merged.norm(dim=1))[:, None]
        return merged


def lora_updates(run: Run, model: torch.nn.Module) -> dict[str, LoraUpdate]:
    """Every target's update, checked against the shapes of the model's layers."""
    layer_cls = METHODS[run.spec.method]
    linears = trained_targets(model, run.targets)
    updates = {}
    for name in linears:
        tensors = run.layer_tensors(name)
        try:
            B, A = (t.float() for t in layer_cls.lora_update(tensors, run.spec))
        except KeyError as error:
            raise QSVDError(f"{run.path} has no tensor {name}.{error.args[0]}: the run is incomplete") from None
        magnitude = tensors["magnitude"].float() if "magnitude" in layer_cls.trainable else None
        out_features, in_features = linears[name].weight.shape
        if (B.shape[0], A.shape[1]) != (out_features, in_features) or (
                magnitude is not None and magnitude.shape != (out_features,)):
            raise QSVDError(f"the adapter of {name} in {run.path} does not fit the layer "
                            f"({out_features} × {in_features}): the run is corrupt")
        updates[name] = LoraUpdate(B, A, magnitude)
    return updates


def base_model_name(run: Run, files: ModelFiles) -> str:
    """What the export applies to: a hub repo id, or the local directory or GGUF file."""
    if files.repo_id is not None:
        return files.repo_id
    return str(files.weights[0] if files.gguf else files.config_dir)


def base_loader(run: Run, files: ModelFiles) -> str:
    """The Python expression that loads the original base model with transformers."""
    if files.gguf:
        gguf = files.weights[0]
        return f"AutoModelForCausalLM.from_pretrained({str(gguf.parent)!r}, gguf_file={gguf.name!r})"
    revision = run.record["config"].get("revision")
    pinned = f", revision={revision!r}" if revision else ""
    return f"AutoModelForCausalLM.from_pretrained({base_model_name(run, files)!r}{pinned})"


def peft_targets(updates: dict[str, LoraUpdate], model: torch.nn.Module) -> list[str]:
    """PEFT's target_modules: the layer kinds (q_proj, …) where they name exactly the adapted
    layers, else every adapted layer by its full name."""
    kinds = sorted({name.rsplit(".", 1)[-1] for name in updates})
    return kinds if find_targets(model, kinds).keys() == updates.keys() else sorted(updates)


def write_peft(output: Path, run: Run, updates: dict[str, LoraUpdate], target_modules: list[str],
               base_model: str) -> None:
    """adapter_config.json (written by PEFT's own LoraConfig) and adapter_model.safetensors."""
    rank = next(iter(updates.values())).A.shape[0]
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=target_modules,
                        lora_dropout=run.spec.dropout, use_dora=has_magnitude(updates), bias="none",
                        task_type="CAUSAL_LM", base_model_name_or_path=base_model, inference_mode=True)
    config.save_pretrained(output)
    tensors = {}
    for name, update in updates.items():
        prefix = f"base_model.model.{name}"
        tensors[f"{prefix}.lora_A.weight"] = update.A.contiguous()
        tensors[f"{prefix}.lora_B.weight"] = update.B.contiguous()
        if update.magnitude is not None:
            tensors[f"{prefix}.lora_magnitude_vector"] = update.magnitude.contiguous()
    save_file(tensors, output / PEFT_WEIGHTS, metadata={"format": "pt"})


def has_magnitude(updates: dict[str, LoraUpdate]) -> bool:
    return any(update.magnitude is not None for update in updates.values())


def checkpoint_names(model: torch.nn.Module) -> list[str]:
    """The tensors a checkpoint of `model` holds: tied parameters once, under their first name."""
    model.tie_weights()  # an empty model is built untied
    unique = dict(model.named_parameters())
    every_parameter = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return [name for name in model.state_dict() if name in unique or name not in every_parameter]


def plan_shards(model: torch.nn.Module, names: list[str], dtype: torch.dtype, shard_bytes: int) -> list[list[str]]:
    """Consecutive tensors grouped into shards of at most `shard_bytes` (a larger tensor alone)."""
    state = model.state_dict()

    def stored_bytes(name: str) -> int:
        tensor = state[name]
        return tensor.numel() * (dtype.itemsize if tensor.is_floating_point() else tensor.element_size())

    return group_by_size({name: stored_bytes(name) for name in names}, shard_bytes)


def merged_reader(run: Run, files: ModelFiles, model: torch.nn.Module, updates: dict[str, LoraUpdate],
                  base: str):
    """name → that tensor of the merged model: a target's weight merged (fp32), any other as stored."""
    layer_cls = METHODS[run.spec.method]
    weights = open_weights(files, model)

    def read_merged(name: str) -> torch.Tensor:
        value = weights.read(name)
        layer = name.removesuffix(".weight")
        if layer in updates:  # a target's weight (its bias is copied as it is)
            value = value.float()
            if base == "dequantized":  # W − (F − deq(Q(F))): what training multiplied by
                frozen = layer_cls.frozen_weight(value, run.layer_tensors(layer), run.spec)
                value = value - (frozen - quantize.roundtrip(frozen, run.spec.bits, run.compute_dtype))
            value = updates[layer].merge(value)
        return value

    return read_merged


def write_merged(output: Path, run: Run, files: ModelFiles, model: torch.nn.Module,
                 updates: dict[str, LoraUpdate], base: str, dtype: torch.dtype, shard_bytes: int) -> None:
    """A standard HF checkpoint with every update merged, read and written one shard at a time."""
    read_merged = merged_reader(run, files, model, updates, base)
    config = read_config(files.config_dir, run.trust_remote_code)
    tokenizer = read_tokenizer(files.config_dir, run.trust_remote_code)

    def export_tensor(name: str) -> torch.Tensor:
        value = read_merged(name)
        return value.to(dtype).contiguous() if value.is_floating_point() else value.contiguous()

    shards = plan_shards(model, checkpoint_names(model), dtype, shard_bytes)
    file_names = (["model.safetensors"] if len(shards) == 1 else
                  [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
    closes_shard = {names[-1]: file_name for file_name, names in zip(file_names, shards)}
    weight_map, total_size, shard = {}, 0, {}
    for name in track([name for names in shards for name in names], description="merge", console=console):
        shard[name] = export_tensor(name)
        if name in closes_shard:
            save_file(shard, output / closes_shard[name], metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, closes_shard[name]))
            total_size += sum(tensor.nbytes for tensor in shard.values())
            shard = {}
            return_freed_memory()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (output / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.architectures = [type(model).__name__]
    config.dtype = dtype
    config.save_pretrained(output)
    if (files.config_dir / "generation_config.json").is_file():
        shutil.copyfile(files.config_dir / "generation_config.json", output / "generation_config.json")
    tokenizer.save_pretrained(output)


def card_rows(run: Run, updates: dict[str, LoraUpdate], exported: str) -> list[tuple[str, str]]:
    """The adapter card's table: the method, the base, the data, the budget and the scores."""
    config, record, spec = run.record["config"], run.record, run.spec
    steps = max((entry["step"] for entry in run.log if "step" in entry), default="?")
    rows = [("method", f"{spec.method}: {METHODS[spec.method].summary}"),
            ("rank", f"{spec.rank} (alpha {spec.alpha:g}, s = {spec.scale:g})"),
            ("frozen base in training", f"{spec.bits}-bit" + (" NF4" if spec.bits == 4 else "")),
            ("base model", f"{run.model} (fingerprint {run.fingerprint})"),
            ("data", config.get("data") or "built-in arithmetic word problems"),
            ("steps", f"{steps} × batch {config.get('batch_size')} × grad accum {config.get('grad_accum')}, "
                      f"seq len {config.get('seq_len')}, lr {config.get('lr')}"),
            ("trainable params", f"{record['trainable_params']:,}"),
            ("final training loss", f"{record['final_loss']:.4f}")]
    for stem, result in record.get("eval", {}).items():
        score = (f"perplexity {result['perplexity']:.3f}" if result["task"] == "ppl" else
                 f"accuracy {100 * result['accuracy']:.1f}% ({result['correct']}/{result['examples']})")
        rows.append((f"eval: {stem}", f"{result['task']}: {score}"))
    return rows + [("exported as", f"{exported}, by qsvd {__version__}")]


def card(run: Run, files: ModelFiles, updates: dict[str, LoraUpdate], format: str, base: str, weights: str,
         final_output: Path) -> str:
    """The model card (README.md): metadata for the Hub, what was trained, on what, how long, how well,
    and how to load or run the export. `weights`: the merged dtype, or the GGUF type."""
    if format == "peft":
        rank = next(iter(updates.values())).A.shape[0]
        exported = f"a rank-{rank} PEFT " + ("DoRA adapter" if has_magnitude(updates) else "LoRA adapter")
        load = (f"from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
                f"base = {base_loader(run, files)}\nmodel = PeftModel.from_pretrained(base, {str(final_output)!r})")
    elif format == "merged":
        exported = f"a merged checkpoint in {weights}, merged into the {base} base weights"
        load = (f"from transformers import AutoModelForCausalLM\n\n"
                f"model = AutoModelForCausalLM.from_pretrained({str(final_output)!r})")
    else:
        exported = f"a GGUF file in {weights}, merged into the {base} base weights"
        load = f"qsvd chat {final_output}\nollama create {run.path.name} -f {gguf_companions(final_output)[0]}"
    table = "\n".join(f"| {key} | {value} |" for key, value in card_rows(run, updates, exported))
    note = ""
    if run.spec.bits < 16 and base == "original":
        note = (f"\nThe adapter was trained against a {run.spec.bits}-bit copy of the base. On the original "
                f"weights its outputs differ from the trained model's by about that quantization's error; "
                f"`qsvd export --format merged --base dequantized` merges into the weights it was trained against.\n")
    library = {"peft": "peft", "merged": "transformers", "gguf": "gguf"}[format]
    tags = ["qsvd", run.spec.method] + (["gguf", weights] if format == "gguf" else [])
    front_matter = (f"---\nbase_model: {base_model_name(run, files)}\nlibrary_name: {library}\ntags:\n"
                    + "".join(f"- {tag}\n" for tag in tags) + "---\n")
    local = ""
    if format != "gguf" and read_config(files.config_dir, run.trust_remote_code).model_type in ARCHITECTURES:
        gguf, name = run.path.with_name(f"{run.path.name}-q8_0.gguf"), run.path.name
        local = (f"\n## Run it locally: llama.cpp, Ollama, LM Studio\n\n```bash\n"
                 f"qsvd export {run.path} --format gguf --gguf-type q8_0   # {gguf.name} and "
                 f"{gguf.with_suffix('.Modelfile').name}\n"
                 f"ollama create {name} -f {gguf.with_suffix('.Modelfile')} && ollama run {name}\n```\n")
    return (f"{front_matter}\n# {run.spec.method} fine-tune of {run.model}\n\nTrained with qsvd (run {run.path.name}).\n\n"
            f"| | |\n|---|---|\n{table}\n{note}\n## {'Run' if format == 'gguf' else 'Load'}\n\n"
            f"```{'bash' if format == 'gguf' else 'python'}\n{load}\n```\n{local}")


def gguf_companions(output: Path) -> tuple[Path, Path]:
    """A GGUF export's Ollama Modelfile and model card, beside the file."""
    return output.with_suffix(".Modelfile"), output.with_suffix(".md")


def check_gguf_output(output: Path, overwrite: bool) -> None:
    if output.suffix != ".gguf":
        raise QSVDError(f"--output {output}: a GGUF export is one file, named *.gguf")
    check_writable(output)
    for path in (output, *gguf_companions(output)):
        if path.is_dir() or (path.exists() and not overwrite):
            raise QSVDError(f"{path} already exists; choose another --output or pass --overwrite")


def export(run_dir: str | Path, output: str | Path | None = None, format: str = "peft", base: str = "original",
           dtype: str = "bf16", shard_size: str = SHARD_SIZE, gguf_type: str = "f16", overwrite: bool = False,
           push_to_hub: str | None = None, private: bool = False, revision: str | None = None) -> Path:
    """Export a run as `qsvd export` does; returns the export directory (the file, for gguf).

    Everything is checked before anything is written, and each output appears in one rename. With
    `push_to_hub` (ORG/NAME) the finished export is then uploaded to that Hub model repo.
    """
    if format not in FORMATS:
        raise QSVDError(f"--format {format!r} is not one of: {', '.join(FORMATS)}")
    if base not in BASES:
        raise QSVDError(f"--base {base!r} is not one of: {', '.join(BASES)}")
    if dtype not in DTYPES:
        raise QSVDError(f"--dtype {dtype!r} is not one of: {', '.join(DTYPES)}")
    if gguf_type not in EXPORT_TYPES:
        raise QSVDError(f"--gguf-type {gguf_type!r} is not one of: {', '.join(EXPORT_TYPES)}")
    if format == "gguf" and gguf_type in LLAMA_CPP_TYPES:
        llama_cpp(f"--gguf-type {gguf_type}")
    if format == "peft" and base != "original":
        raise QSVDError("a PEFT adapter always applies to the original base; --base dequantized "
                        "is for --format merged and gguf")
    if push_to_hub is not None:
        check_repo_id(push_to_hub)
    elif private or revision is not None:
        raise QSVDError("--private and --revision are for --push-to-hub")
    shard_bytes = parse_size(shard_size, "--shard-size")
    run = read_run(run_dir)
    if format == "gguf":
        output = Path(output) if output is not None else run.path.with_name(f"{run.path.name}-{gguf_type}.gguf")
        check_gguf_output(output, overwrite)
    else:
        output = Path(output) if output is not None else run.path.with_name(f"{run.path.name}-{format}")
        check_output(output, overwrite)
    files = run.model_files()
    model = empty_model(files, run.trust_remote_code)
    if format == "gguf":  # what GGUF cannot hold is refused before any tensor is read
        tokenizer = read_tokenizer(files.config_dir, run.trust_remote_code)
        architecture = gguf_architecture(model.config)
        vocabulary = read_vocabulary(files, tokenizer, model.config.vocab_size)
    updates = lora_updates(run, model)
    card_text = card(run, files, updates, format, base, gguf_type if format == "gguf" else dtype, output)
    title = f"{run.spec.method} fine-tune of {run.model}"  # the GGUF's general.name and the Modelfile's first line

    def write(tmp: Path) -> None:
        if format == "peft":
            write_peft(tmp, run, updates, peft_targets(updates, model), base_model_name(run, files))
        else:
            write_merged(tmp, run, files, model, updates, base, DTYPES[dtype], shard_bytes)
        (tmp / "README.md").write_text(card_text)

    def write_gguf_file(tmp: Path) -> None:
        """The GGUF; a k-quant is made by llama.cpp from an f16 file written first."""
        names, read_merged = checkpoint_names(model), merged_reader(run, files, model, updates, base)
        if gguf_type in GGUF_TYPES:
            return write_gguf(tmp, model, architecture, vocabulary, files, names, read_merged, gguf_type, title)
        f16 = output.with_name(f".{output.name}.f16{temp_suffix()}")
        try:
            write_gguf(f16, model, architecture, vocabulary, files, names, read_merged, "f16", title)
            llama_quantize(f16, tmp, gguf_type)
        finally:
            remove(f16)

    with one_writer(output, wait=False):
        if format == "gguf":  # the file, then its Modelfile and card beside it, each in one rename
            publish(output, write_gguf_file, directory=False)
            modelfile_path, card_path = gguf_companions(output)
            text = modelfile(output, f"{title}, {gguf_type} weights, by qsvd {__version__}", tokenizer.chat_template,
                             tokenizer.eos_token)
            publish(modelfile_path, lambda tmp: tmp.write_text(text), directory=False)
            publish(card_path, lambda tmp: tmp.write_text(card_text), directory=False)
        else:
            publish(output, write)
    console.print(f"exported {run.path} ({run.spec.method}) as {format} to {output}")
    if push_to_hub is not None:
        contents = output if format != "gguf" else {output.name: output, modelfile_path.name: modelfile_path,
                                                     "README.md": card_path}
        upload(push_to_hub, contents, private, revision, output)
    return output
