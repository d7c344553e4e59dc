"""Random-weight MedGemma look-alikes, built offline in seconds with the real Gemma 3 classes.

Real MedGemma weights cannot be downloaded here (and are gated anyway), but the service, its tests and
its benchmarks need a model that runs exactly the code paths the real one does:
``Gemma3ForConditionalGeneration`` with a SigLIP tower and ``Gemma3Processor`` (like google/medgemma-4b-it),
or ``Gemma3ForCausalLM`` with a tokenizer (like google/medgemma-27b-text-it). This module writes such
checkpoints with random weights and a small hand-made tokenizer, in the real checkpoints' file layout, so
they load through the ``Auto*`` classes offline and without ``trust_remote_code``.

Two sizes: ``tiny`` (under 0.5 MB, for the test suite) and ``small`` (~31M parameters, for CPU benchmarks
whose per-token cost is tensor work rather than Python overhead), defined in :mod:`medgemma.demo_sizes` with
the config built from them and the real MedGemma dimensions (which ``scripts/gpu_check.py`` builds). Their
output is meaningless text: the README written next to the weights says so, and the ``medgemma_demo`` key in
config.json lets the service tell a demo from a real model (see :func:`is_demo_checkpoint`).

CLI: ``python -m medgemma.demo --kind vlm --size tiny [--out DIR]`` prints the checkpoint path, alone, on
stdout, so that scripts can do ``MEDGEMMA_MODEL=$(python -m medgemma.demo)``; logging goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import logging
import os
import shutil
import string
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from medgemma.chat_template import CHAT_TEMPLATE
from medgemma.demo_sizes import DEMO_SIZES, END_OF_TURN, Kind, Size, model_config

if TYPE_CHECKING:
    from transformers import GemmaTokenizer, PreTrainedModel

logger = logging.getLogger(__name__)

DEMO_FORMAT = 1
"""Bumped whenever the checkpoint layout or sizes change, so cached demo checkpoints are rebuilt, not reused."""
DEMO_CONFIG_KEY = "medgemma_demo"
"""Extra config.json key (also in the VLM's text_config): ``{"size": ..., "kind": ..., "seed": ...}``."""

KINDS: tuple[Kind, ...] = get_args(Kind)
SIZES: tuple[Size, ...] = get_args(Size)

DEMO_DIR_ENV = "MEDGEMMA_DEMO_DIR"
"""Environment variable naming the directory that :func:`ensure_checkpoint` builds into by default."""

# --- Tokens ---------------------------------------------------------------------------------------------
# Ids follow the real Gemma 3 vocabulary where that is cheap (pad 0, eos 1, bos 2, unk 3, mask 4,
# <unused0..98> from 6, <start_of_turn> 105, <end_of_turn> 106, "\n" 107, "\n\n" 108), so the EOS ids are
# [1, 106] exactly as in google/medgemma-4b-it. The image tokens cannot keep their real ids (255999, 256000,
# 262144) in a 1024-token vocabulary; they come next, and the config carries them, which is what the model
# reads.
PAD, EOS, BOS, UNK, MASK = "<pad>", "<eos>", "<bos>", "<unk>", "<mask>"
START_OF_TURN = "<start_of_turn>"  # END_OF_TURN: from medgemma.demo_sizes, which needs it too
BOI, EOI, IMAGE_SOFT = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
SPACE = "\u2581"  # "▁": GemmaTokenizer's normalizer turns " " into it, its decoder turns it back
_N_UNUSED = 99  # <unused0>..<unused98>; the 27B model's "thinking" is delimited by <unused94>/<unused95>
_VOCAB_SIZE = 1024  # one tokenizer for both sizes, so token ids are the same for tiny and small

# Ordinary words for the sub-word vocabulary, most frequent first, so that token counts and generated text
# look like a real tokenizer's rather than a byte stream.
_WORD_TEXT = """
the of and to in is that for it with as was on be by this are or at from an not have has had were which but
can will may no all one there their been more also other some these its than into only two after most such
what when who how why where should could would does did do if then so very about over under between before
during without within each both any many much new first last left right upper lower normal abnormal patient
patients history clinical finding findings impression image images study exam report scan chest lung lungs
heart cardiac liver kidney renal brain bone bones spine skin breast eye retina fundus head neck abdomen
pelvis mass nodule lesion lesions opacity effusion pleural consolidation pneumonia pneumothorax edema
fracture tumor cancer benign malignant acute chronic mild moderate severe small large size shape margin
margins density contrast enhancement infiltrate atelectasis cardiomegaly mediastinum hilar airway trachea
diaphragm rib ribs vertebral soft tissue tissues blood pressure pain fever cough dyspnea diagnosis
differential treatment therapy dose follow up recommend recommended consider likely unlikely possible
suggest suggests consistent evidence seen noted present absent stable unchanged increased decreased
compared prior previous view views frontal lateral axial coronal sagittal slice slices ct mri xray
radiograph ultrasound dermatology pathology histology cell cells sample slide stain grade year years old
male female man woman age days weeks months time medical model answer question describe please help thank
you yes information data result results test tests appears appear limits cardiopulmonary process clear
silhouette visible
"""
_WORDS: tuple[str, ...] = tuple(dict.fromkeys(_WORD_TEXT.split()))
_BARE_WORDS = ("user", "model", "system")  # follow "<start_of_turn>" directly, without a space
# Common non-ASCII characters with a token of their own (degree, plus-minus, micro, times, divide, e-acute,
# dashes, curly quotes, ellipsis); other characters use byte tokens.
_EXTRA_CHARS = "\u00b0\u00b1\u00b5\u00d7\u00f7\u00e9\u2013\u2014\u2019\u201c\u201d\u2026"


# The Gemma 3 chat template, to the rules in shared/notes/gemma3-offline.md, and equal to Google's on every
# conversation Google's accepts: <bos>; each turn <start_of_turn>{role}\n...<end_of_turn>\n; "assistant" is
# written "model"; a system message is not a turn, its text plus a blank line opens the first user turn;
# image parts ("image" or "image_url") become <start_of_image>, which the processor expands; text parts are
# trimmed; roles must alternate user/model. Stricter than Google's in two ways: a system message anywhere
# but first, and an unknown part type, raise instead of being written as a turn or dropped silently.
_README = """\
# {name}: random-weight MedGemma demo checkpoint

**This is not a medical model.** Its weights are random (seed {seed}); it produces meaningless text.
It exists so that the MedGemma service, its tests and its benchmarks can run offline with the real
Gemma 3 architecture (`{architecture}`) and the same file layout as `{like}`.

Built by `medgemma.demo` (kind `{kind}`, size `{size}`): {params:,} parameters, a tokenizer of {vocab}
tokens. `config.json` carries `"{key}": {{"size": "{size}", "kind": "{kind}", "seed": {seed}}}`.
"""

# torch's RNG is process-global: builds in two threads would interleave their draws and break "same seed,
# same weights", so seeded initialisation runs under this lock.
_BUILD_LOCK = threading.Lock()


def checkpoint_name(kind: Kind, size: Size) -> str:
    """Directory name of a demo checkpoint, after the real ids (medgemma-4b-it, medgemma-27b-text-it)."""
    _check_kind_size(kind, size)
    return f"medgemma-demo-{size}-it" if kind == "vlm" else f"medgemma-demo-{size}-text-it"


def is_demo_checkpoint(config: Any) -> bool:
    """True when a loaded transformers config (or a config.json dict, or a model) is a demo checkpoint's.

    The VLM carries the key both at the top level and in its ``text_config``, so code that only holds
    ``config.get_text_config()`` recognises a demo too; a composite config is checked at both levels.
    """
    if config is None:
        return False
    if not isinstance(config, Mapping) and not hasattr(config, "to_dict") and hasattr(config, "config"):
        config = config.config  # a model: look at its config
    candidates = [config, _field(config, "text_config")]
    return any(isinstance(_field(c, DEMO_CONFIG_KEY), Mapping) for c in candidates if c is not None)


def _field(obj: Any, name: str) -> Any:
    """``obj[name]`` for a dict (config.json), ``obj.name`` for a config object; None when absent."""
    return obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)


def default_root() -> Path:
    """Where :func:`ensure_checkpoint` builds by default: $MEDGEMMA_DEMO_DIR, else ~/.cache/medgemma/demo."""
    env = os.environ.get(DEMO_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "medgemma" / "demo"


def ensure_checkpoint(kind: Kind = "vlm", size: Size = "tiny", root: str | Path | None = None) -> Path:
    """Return ``root/checkpoint_name(kind, size)``, building it (seed 0) first if it is not there yet.

    The build goes to a temporary sibling directory that is then renamed into place, so an interrupted or
    concurrent build never leaves a half-written checkpoint under the final name. Concurrent callers
    (threads or processes) take turns on a lock file; the later ones find the finished directory and use it.
    """
    _check_kind_size(kind, size)
    root_path = Path(root).expanduser() if root is not None else default_root()
    target = root_path / checkpoint_name(kind, size)
    if _is_valid_checkpoint(target, kind, size):
        return target
    root_path.mkdir(parents=True, exist_ok=True)
    with _file_lock(root_path / f".{target.name}.lock") as exclusive:
        if _is_valid_checkpoint(target, kind, size):  # built while we waited for the lock
            return target
        if exclusive:
            # Nobody else can be building this name now: temporary directories are from killed builds.
            for leftover in root_path.glob(f".{target.name}.tmp-*"):
                shutil.rmtree(leftover, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root_path))
        try:
            build_checkpoint(tmp, kind=kind, size=size, seed=0)
            # mkdtemp made it 0700; give it the mode of the files in it, plus x where there is r
            file_mode = (tmp / "config.json").stat().st_mode & 0o777
            tmp.chmod(file_mode | ((file_mode & 0o444) >> 2))
            if target.exists() or target.is_symlink():
                # Never one of ours (we never leave partial ones): a stray directory or an older layout.
                logger.warning("Replacing %s: not a complete %s/%s demo checkpoint", target, kind, size)
                stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=root_path))
                os.replace(target, stale / "old")
                shutil.rmtree(stale, ignore_errors=True)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    logger.info("Demo checkpoint ready: %s", target)
    return target


def build_checkpoint(path: str | Path, *, kind: Kind = "vlm", size: Size = "tiny", seed: int = 0) -> Path:
    """Write a random-weight demo checkpoint into ``path`` (created if needed) and return the path.

    Deterministic: the same ``kind``, ``size`` and ``seed`` give bit-identical weights, and the global torch
    RNG is left as it was. Writes straight into ``path``; :func:`ensure_checkpoint` builds atomically.
    """
    _check_kind_size(kind, size)
    import torch
    from transformers import GenerationConfig

    spec = DEMO_SIZES[size]
    spec.check()
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    started_ns = time.time_ns()

    tokenizer = build_tokenizer()
    demo_info = {"size": size, "kind": kind, "seed": seed, "format": DEMO_FORMAT}
    config = model_config(kind, spec, tokenizer, extra={DEMO_CONFIG_KEY: demo_info})
    with _BUILD_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _instantiate(kind, config)
        _post_init_weights(model, tokenizer)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=config.get_text_config().eos_token_id,  # [<eos>, <end_of_turn>]
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(out)  # safetensors
    if kind == "vlm":
        build_processor(
            tokenizer, image_size=spec.image_size, tokens_per_image=spec.mm_tokens_per_image
        ).save_pretrained(out)  # also saves the tokenizer and the template
    else:
        tokenizer.save_pretrained(out)

    params = sum(p.numel() for p in model.parameters())
    readme = out / "README.md"
    readme.write_text(
        _README.format(
            name=checkpoint_name(kind, size),
            seed=seed,
            architecture=type(model).__name__,
            like="google/medgemma-4b-it" if kind == "vlm" else "google/medgemma-27b-text-it",
            kind=kind,
            size=size,
            params=params,
            vocab=len(tokenizer),
            key=DEMO_CONFIG_KEY,
        ),
        encoding="utf-8",
    )
    _normalise_permissions(out, reference=readme, since_ns=started_ns)
    logger.info(
        "Built %s/%s demo checkpoint in %s (%d parameters, %.1fs)",
        kind,
        size,
        out,
        params,
        time.perf_counter() - started,
    )
    return out


def build_tokenizer() -> GemmaTokenizer:
    """A ``GemmaTokenizer`` (tokenizers-backed BPE with byte fallback) over a small in-memory vocabulary.

    Any text survives encode then decode (characters without a token become ``<0xNN>`` byte tokens), except
    a literal "▁", which Gemma's normalizer and decoder use for the space, exactly as in the real tokenizer.
    """
    from tokenizers import AddedToken
    from transformers import GemmaTokenizer

    vocab, merges, specials, unused = _build_vocab_and_merges()
    tokenizer = GemmaTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        mask_token=MASK,
        # Named multimodal tokens: Gemma3Processor reads tokenizer.boi_token, eoi_token and image_token.
        boi_token=BOI,
        eoi_token=EOI,
        image_token=IMAGE_SOFT,
        extra_special_tokens=[START_OF_TURN, END_OF_TURN],
        add_bos_token=True,
        add_eos_token=False,
        padding_side="left",  # decoder-only generation pads on the left
        model_max_length=DEMO_SIZES["small"].max_position_embeddings,
        chat_template=CHAT_TEMPLATE,
    )
    # These ids are in the vocabulary already; registering them as added tokens keeps them whole in any text
    # (never split by BPE), and lets skip_special_tokens drop the special ones.
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials], special_tokens=True)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in unused])
    return tokenizer


@functools.lru_cache(maxsize=1)
def _build_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...], list[str], list[str]]:
    """Vocabulary (Gemma-like ids, see above), BPE merges, and the special and unused token lists.

    The sub-word part is a small BPE trained here, deterministically, on the word list (each word as
    SentencePiece-style "▁word", earlier words counted as more frequent), so text splits into plausible
    pieces ("▁the", "ation", ...) as with a real tokenizer. Cached: pure, and a fraction of a second.
    """
    specials_head = [PAD, EOS, BOS, UNK, MASK]
    unused = [f"<unused{i}>" for i in range(_N_UNUSED)]
    tokens: list[str] = [*specials_head, "[multimodal]", *unused, START_OF_TURN, END_OF_TURN, "\n", "\n\n"]
    tokens += [BOI, EOI, IMAGE_SOFT]
    tokens += [f"<0x{b:02X}>" for b in range(256)]  # byte fallback: every UTF-8 byte has a token
    chars = [SPACE, "\t", *string.ascii_letters, *string.digits, *string.punctuation, *_EXTRA_CHARS]
    tokens += [c for c in chars if c not in tokens]
    merges: list[tuple[str, str]] = [("\n", "\n")]
    corpus = {SPACE + word: len(_WORDS) - rank for rank, word in enumerate(_WORDS)}
    corpus |= {word: 2 * len(_WORDS) for word in _BARE_WORDS}
    for pair in _train_bpe(corpus, _VOCAB_SIZE - len(tokens)):
        merges.append(pair)
        tokens.append(pair[0] + pair[1])
    if len(set(tokens)) != len(tokens) or len(tokens) > _VOCAB_SIZE:
        raise AssertionError("demo vocabulary construction is inconsistent")
    # Only if the word list ran out of merges before the target size:
    more_unused = [f"<unused{i}>" for i in range(_N_UNUSED, _N_UNUSED + _VOCAB_SIZE - len(tokens))]
    tokens += more_unused
    vocab = {token: i for i, token in enumerate(tokens)}
    specials = [*specials_head, START_OF_TURN, END_OF_TURN, BOI, EOI, IMAGE_SOFT]
    return vocab, tuple(merges), specials, ["[multimodal]", *unused, *more_unused]


def _train_bpe(corpus: Mapping[str, int], n_merges: int) -> list[tuple[str, str]]:
    """Plain BPE training: merge the most frequent adjacent pair (ties: the smallest pair), repeat."""
    words = [(list(word), count) for word, count in sorted(corpus.items())]
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pair_counts: Counter[tuple[str, str]] = Counter()
        for symbols, count in words:
            for pair in itertools.pairwise(symbols):
                pair_counts[pair] += count
        if not pair_counts:
            break  # every word is a single token already
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        merges.append(best)
        for symbols, _ in words:
            i = 0
            while i < len(symbols) - 1:
                if (symbols[i], symbols[i + 1]) == best:
                    symbols[i : i + 2] = [best[0] + best[1]]
                i += 1
    return merges


def _instantiate(kind: Kind, config: Any) -> PreTrainedModel:
    """The real Gemma 3 model class for ``kind``, initialised by transformers from the global torch RNG."""
    from transformers import Gemma3ForCausalLM, Gemma3ForConditionalGeneration

    model_cls = Gemma3ForConditionalGeneration if kind == "vlm" else Gemma3ForCausalLM
    model = model_cls(config)
    model.eval()
    return model


def _post_init_weights(model: PreTrainedModel, tokenizer: GemmaTokenizer) -> None:
    """Fix the two places where transformers' initialisation makes a poor demo.

    * The multimodal projector starts at zeros (right for training; for a demo it means images have no
      effect on the output at all). It gets random weights scaled to give the projected image features
      unit RMS, the same order as the scaled text embeddings.
    * The tied embedding rows of tokens that a model should never generate (padding, unused, image
      placeholders) are zeroed: their logit is then exactly 0, far below the top logit, so greedy decoding
      never emits them and sampling rarely does. An emitted <image_soft_token> would otherwise be taken for
      an image placeholder by the next decoding step.
    """
    import torch

    projector = getattr(getattr(model, "model", None), "multi_modal_projector", None)
    with torch.no_grad():
        if projector is not None:
            weight = projector.mm_input_projection_weight
            weight.normal_(0.0, weight.shape[0] ** -0.5)
        never = [PAD, UNK, MASK, BOI, EOI, IMAGE_SOFT, "[multimodal]"]
        never += [t for t in tokenizer.get_vocab() if t.startswith("<unused")]
        rows = torch.tensor(tokenizer.convert_tokens_to_ids(never))
        model.get_input_embeddings().weight[rows] = 0.0


def build_processor(tokenizer: GemmaTokenizer, *, image_size: int, tokens_per_image: int) -> Any:
    """Gemma3Processor: the tokenizer plus a Gemma 3 image processor sized to the vision tower."""
    from transformers import Gemma3Processor

    # Look for torchvision first: asking transformers for Gemma3ImageProcessor without it logs a fallback
    # warning. Both classes save as "Gemma3ImageProcessor"; a reload picks whichever backend is installed.
    try:
        import torchvision  # noqa: F401
    except ImportError:
        from transformers import Gemma3ImageProcessorPil as image_processor_cls
    else:
        from transformers import Gemma3ImageProcessor as image_processor_cls
    image_processor = image_processor_cls(
        size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_resize=True,
        do_rescale=True,
        do_normalize=True,
        do_convert_rgb=True,
        do_pan_and_scan=False,
    )
    return Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        image_seq_length=tokens_per_image,  # must equal the config's mm_tokens_per_image
    )


def _is_valid_checkpoint(path: Path, kind: Kind, size: Size) -> bool:
    """Cheap completeness check: the files a load needs exist and config.json names this kind and size."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    demo_info = config.get(DEMO_CONFIG_KEY) if isinstance(config, dict) else None
    if not isinstance(demo_info, dict) or demo_info.get("kind") != kind or demo_info.get("size") != size:
        return False
    if demo_info.get("format") != DEMO_FORMAT:
        return False  # built by an older version of this module: rebuild rather than serve a stale layout
    needed = ["model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]
    needed += ["README.md", "processor_config.json"] if kind == "vlm" else ["README.md"]
    return all((path / name).is_file() for name in needed)


def _normalise_permissions(directory: Path, *, reference: Path, since_ns: int) -> None:
    """Give the files written since ``since_ns`` the mode a plain ``open()`` gets (``reference``'s mode).

    transformers writes model.safetensors through a private temporary file (mode 0600); a shared cache
    built by one user or container must stay readable by the others. Older files are left alone, so that
    ``--out`` pointing at a directory with other content changes nothing else in it.
    """
    file_mode = reference.stat().st_mode & 0o777
    for item in directory.iterdir():
        stat = item.lstat()
        if item.is_file() and not item.is_symlink() and stat.st_mtime_ns >= since_ns - 2_000_000_000:
            item.chmod(file_mode)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[bool]:
    """Exclusive advisory lock between processes and threads (each call opens its own file description).

    Yields whether the lock is really held: without ``fcntl`` (not POSIX) it is not, and concurrent builds
    then race to the atomic rename instead.
    """
    try:
        import fcntl
    except ImportError:
        yield False
        return
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _check_kind_size(kind: str, size: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, not {size!r}")


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: build (or find) a demo checkpoint and print its path, alone, on stdout."""
    parser = argparse.ArgumentParser(
        prog="python -m medgemma.demo",
        description="Build a random-weight MedGemma demo checkpoint (real Gemma 3 classes, offline).",
    )
    parser.add_argument("--kind", choices=KINDS, default="vlm", help="vlm: image+text (4B-like); text: text only")
    parser.add_argument("--size", choices=SIZES, default="tiny", help="tiny: tests; small: ~31M params, benchmarks")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"build exactly here (overwriting files); default: the shared cache (${DEMO_DIR_ENV} or "
        "~/.cache/medgemma/demo), built once and reused",
    )
    parser.add_argument("--seed", type=int, default=0, help="weight seed (only with --out)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if args.out is not None:
        path = build_checkpoint(args.out, kind=args.kind, size=args.size, seed=args.seed)
    else:
        if args.seed != 0:
            parser.error("--seed needs --out: the shared cache holds seed 0 only")
        path = ensure_checkpoint(args.kind, args.size)
    sys.stdout.write(f"{path.resolve()}\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
