"""Vision-language models: the weight chain on mlx-vlm models.

Sensitivity is the KL of the language model's next-token distribution over
the text that follows the image (the question and the reference model's own
answer), with one layer quantized; the vision tower and the projector are
probed and planned like the language layers. mlx-vlm reads mlx-lm's per-layer
`quantization` entries, so the plan is the exact mixed plan of text models and
the output opens in stock `mlx_vlm.load`.

Images: a folder of .png/.jpg files, each with a .txt prompt beside it, or
(no folder) scenes drawn here with Pillow: shapes, colours, counts and words,
whose true answers are known, so multiple-choice accuracy is measurable
offline. Calibration and evaluation scenes come from different seeds.
"""

import glob
import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import metrics
from .calibration import paired_files
from .errors import OptiqError, require_extra
from .io import atomic_output, write_json
from .model_tree import quantizable_layers
from .probe_hooks import run_it
from .probes import gram_rounding, logits_kl, probe_table, tied_layers
from .records import SensitivityTable
from .source import read_config, to_fp32

COLORS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (30, 70, 220), "yellow": (235, 200, 20), "purple": (140, 50, 170), "orange": (245, 130, 20)}
SHAPES = ("circle", "square", "triangle")
WORDS = ("cat", "tree", "house", "river", "moon", "bread", "train", "apple")
CALIBRATION_QUESTIONS = (
    "Describe this image in one sentence.",
    "What shapes do you see, and what colour are they?",
    "How many shapes are in the picture?",
    "What word is written in the image?",
)
LETTERS = "ABCDEFGH"
VISION_TOWER = "vision_tower."  # mlx-vlm's name for the image encoder
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def require():
    require_extra("mlx_vlm", "vision-language models", "vlm")


def is_vlm(path) -> bool:
    """A checkpoint whose config.json carries a vision_config."""
    return isinstance(read_config(path).get("vision_config"), dict)


def load(path, fp32: bool = True):
    """(model, processor) by stock mlx_vlm.load; floats cast to fp32 for measuring."""
    require()
    from mlx_vlm import load as vlm_load

    if not is_vlm(path):
        raise OptiqError(f"{path} is not a vision-language model folder (config.json with a vision_config)")
    try:
        model, processor = vlm_load(str(path))
    except (ValueError, KeyError, TypeError, FileNotFoundError, OSError) as exc:
        raise OptiqError(f"mlx-vlm cannot load {path}: {type(exc).__name__}: {exc}")
    return (to_fp32(model) if fp32 else model), processor


# -- images ---------------------------------------------------------------------


def draw(shape: str, color: str, count: int = 1, word: str = "", size: int = 224):
    """A white canvas with `count` filled shapes in a row and `word` below them."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), "white")
    pen = ImageDraw.Draw(image)
    cell = size // max(count, 1)
    r = min(cell, size // 2) * 0.35
    for i in range(count):
        cx, cy = cell * i + cell / 2, size * 0.4
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            pen.ellipse(box, fill=COLORS[color])
        elif shape == "square":
            pen.rectangle(box, fill=COLORS[color])
        else:
            pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[color])
    if word:
        pen.text((size * 0.3, size * 0.75), word, fill="black", font_size=size // 8)
    return image


def scenes(n: int, seed: int) -> list:
    """n drawn scenes [(image, facts)] with their true shape, colour, count and word."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        facts = {"shape": str(rng.choice(SHAPES)), "color": str(rng.choice(list(COLORS))), "count": int(rng.integers(1, 5)), "word": str(rng.choice(WORDS))}
        out.append((draw(**facts), facts))
    return out


def drawn_prompts(n: int, seed: int) -> list:
    """[(image, question)] over drawn scenes, cycling the calibration questions."""
    return [(image, CALIBRATION_QUESTIONS[i % len(CALIBRATION_QUESTIONS)]) for i, (image, _) in enumerate(scenes(n, seed))]


def read_images(folder) -> list:
    """[(image, prompt)] from image files with a .txt prompt beside each."""
    from PIL import Image, UnidentifiedImageError

    out = []
    for path in check_images(folder):
        try:
            image = Image.open(path).convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise OptiqError(f"{path}: not a readable image ({exc})")
        out.append((image, path.with_suffix(".txt").read_text().strip()))
    return out


def check_images(folder) -> list:
    """The image files of a folder, once each has a .txt prompt beside it."""
    return paired_files(folder, IMAGE_SUFFIXES, "images", "prompt")


def choice_items(n: int, seed: int) -> list:
    """Built-in diagram questions [(image, question, options, answer index)]:
    AI2D's form (a picture, a question, four options) over drawn scenes whose
    answers are known."""
    rng = np.random.default_rng(seed)
    out = []
    for i, (image, facts) in enumerate(scenes(n, seed)):
        kind = ("shape", "color", "count", "word")[i % 4]
        pool = {"shape": list(SHAPES) + ["star"], "color": list(COLORS), "count": [1, 2, 3, 4], "word": list(WORDS)}[kind]
        wrong = [x for x in pool if x != facts[kind]]
        options = [facts[kind]] + list(rng.choice(wrong, size=3, replace=False))
        order = rng.permutation(4)
        options = [str(options[j]) for j in order]
        question = {
            "shape": "Which shape is drawn in the diagram?",
            "color": "What colour are the shapes?",
            "count": "How many shapes are in the diagram?",
            "word": "Which word is written under the shapes?",
        }[kind]
        out.append((image, question, options, int(np.argmax(order == 0))))
    return out


def read_choices(path) -> list:
    """AI2D-style questions from a .jsonl file: one object per line with
    "image" (a path relative to the file), "question", "options" (a list) and
    "answer" (the option's index, or its letter)."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise OptiqError(f"--data {path}: no such file (AI2D-style .jsonl)")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            options = [str(o) for o in item["options"]]
            answer = item["answer"]
            answer = LETTERS.index(answer) if isinstance(answer, str) and answer in LETTERS else int(answer)
            image = Image.open(path.parent / item["image"]).convert("RGB")
        except (ValueError, KeyError, TypeError, OSError) as exc:
            raise OptiqError(f"{path}:{n}: not an AI2D-style question with image, question, options, answer ({type(exc).__name__}: {exc})")
        if not 2 <= len(options) <= len(LETTERS) or not 0 <= answer < len(options):
            raise OptiqError(f"{path}:{n}: needs 2-{len(LETTERS)} options and an answer among them")
        out.append((image, str(item["question"]), options, answer))
    if not out:
        raise OptiqError(f"{path}: no questions")
    return out


# -- inputs and logits --------------------------------------------------------------


class Sample:
    """One prepared input: mlx-vlm's arrays and where the text after the image starts."""

    def __init__(self, inputs: dict, start: int):
        self.input_ids = inputs["input_ids"]
        self.pixel_values = inputs.get("pixel_values")
        self.mask = inputs.get("attention_mask")
        self.extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "pixel_values", "attention_mask")}
        self.start = start


def image_token_id(model):
    config = model.config
    return getattr(config, "image_token_id", None) or getattr(config, "image_token_index", None)


def chat_prompt(model, processor, question: str) -> str:
    from mlx_vlm.prompt_utils import apply_chat_template

    return apply_chat_template(processor, model.config, question, num_images=1)


def prepare(model, processor, image, prompt: str) -> Sample:
    """mlx-vlm's own preprocessing of one image and a formatted prompt."""
    from mlx_vlm.utils import prepare_inputs, should_add_special_tokens

    from transformers.utils import logging as hf_logging

    quiet = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # mlx-vlm passes processor kwargs the way transformers 5 warns about, per call
    try:
        inputs = prepare_inputs(
            processor, images=[image], prompts=[prompt], image_token_index=image_token_id(model),
            add_special_tokens=should_add_special_tokens(model.config.model_type, processor),
        )
    finally:
        hf_logging.set_verbosity(quiet)
    ids = np.asarray(inputs["input_ids"]).reshape(-1)
    image_at = np.nonzero(ids == image_token_id(model))[0]
    return Sample(inputs, int(image_at[-1]) + 1 if image_at.size else 0)


def forward(model, sample: Sample) -> mx.array:
    """fp32 logits (1, T, V) of the text after the image."""
    out = model(sample.input_ids, sample.pixel_values, mask=sample.mask, **sample.extra)
    logits = getattr(out, "logits", out)
    return logits[:, sample.start :].astype(mx.float32)


def answer(model, processor, image, prompt: str, max_tokens: int) -> str:
    """The model's own greedy answer, by stock mlx_vlm.generate, without
    special tokens (an image token in the text would ask for another image)."""
    from mlx_vlm import generate

    result = generate(model, processor, prompt, [image], max_tokens=max_tokens, temperature=0.0, verbose=False)
    return getattr(processor, "tokenizer", processor).decode(result.token_ids, skip_special_tokens=True)


def calibration(model, processor, source, n: int, seed: int, answer_tokens: int = 24) -> list:
    """[Sample]: each image and question followed by the float model's own
    answer (as self-sampled text calibrates text models), so the KL covers
    the positions where the model answers about the image."""
    pairs = read_images(source)[:n] if source else drawn_prompts(n, seed)
    out = []
    for image, question in pairs:
        prompt = chat_prompt(model, processor, question)
        reply = answer(model, processor, image, prompt, answer_tokens) if answer_tokens else ""
        out.append(prepare(model, processor, image, prompt + reply))
    return out


class RememberedTower(nn.Module):
    """Stands in for the vision tower while only language layers change: its
    output for inputs it has seen (keyed by their content) is computed once.
    Attributes the model reads off the tower (a dtype, a config) pass through."""

    def __init__(self, tower, memo: dict):
        super().__init__()
        self.tower = tower
        object.__setattr__(self, "memo", memo)  # a plain attribute, not a parameter tree

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "tower" or "tower" not in self:
                raise
            return getattr(self["tower"], name)

    @staticmethod
    def _key(args, kwargs):
        def part(x):
            if isinstance(x, mx.array):
                x32 = x.astype(mx.float32)
                return (tuple(x.shape), str(x.dtype), float(mx.sum(x32)), float(mx.sum(x32 * x32)))
            return repr(x)

        return tuple(part(a) for a in args) + tuple((k, part(v)) for k, v in sorted(kwargs.items()))

    def __call__(self, *args, **kwargs):
        key = self._key(args, kwargs)
        if key not in self.memo:
            out = self["tower"](*args, **kwargs)
            mx.eval(out)
            self.memo[key] = out
        return self.memo[key]


@contextmanager
def vision_remembered(model, memo: dict):
    """model.vision_tower replaced by a RememberedTower inside (no tower: unchanged)."""
    tower = model.get("vision_tower") if isinstance(model, dict) else None
    if tower is None:
        yield model
        return
    model["vision_tower"] = RememberedTower(tower, memo)
    try:
        yield model
    finally:
        model["vision_tower"] = tower


class Calibrated:
    """The reference logits of the calibration samples."""

    def __init__(self, model, samples):
        self.model, self.samples, self.tower_outputs = model, samples, {}
        self.refs = [metrics.reference_from_logits(forward(model, s)) for s in samples]
        plain = self.kl()["kl_mean"]  # ~1e-7, not 0: the KL's own rounding
        with vision_remembered(model, self.tower_outputs):  # fills the memo; checks it changes nothing
            self.remembers = abs(self.kl()["kl_mean"] - plain) < 1e-7

    def kl(self, model=None, vision_changed: bool = True) -> dict:
        """Mean KL and top-1 agreement of `model` (default: the reference as it
        stands now, one layer perturbed) over the text after each image. With
        vision_changed False (a language layer perturbed), the reference's
        vision tower outputs are reused instead of recomputed."""
        if vision_changed or model is not None or not self.remembers:
            model = model or self.model
            return logits_kl((ref, forward(model, s)) for s, ref in zip(self.samples, self.refs))
        with vision_remembered(self.model, self.tower_outputs):
            return self.kl(model=self.model)


def quantizable(model) -> tuple:
    """([(path, module)], twins): every Linear and Embedding, vision tower and
    projector included, less the twins the loader ties to another layer
    ({kept path: [(twin path, module)]}, planned and written with it)."""
    return tied_layers(quantizable_layers(model))


def rounding(model, samples, quantizer: str, dtype=mx.float16, refit: bool = True):
    """MLX's rounding, or GPTQ with Grams over the calibration samples'
    forward passes (not for tied layers: twins must share one set of codes)."""
    layers, twins = quantizable(model)
    untied = [(p, m) for p, m in layers if p not in twins]
    return gram_rounding(model, untied, quantizer, lambda: (forward(model, s) for s in samples), dtype, refit)


def measure(model, samples, candidates, rounding, model_id: str = "", on_probe=run_it) -> SensitivityTable:
    cal = Calibrated(model, samples)
    layers, twins = quantizable(model)
    method = f"probe (vlm next-token logits after the image), {rounding.quantizer}"

    def kl_of(path):  # a language-side probe reuses the vision tower's outputs
        return cal.kl(vision_changed=path.startswith(VISION_TOWER))["kl_mean"]

    return probe_table(layers, candidates, kl_of, [s.input_ids for s in samples], model_id, method, rounding, twins, on_probe)


# -- writing --------------------------------------------------------------------


def save(out, model, config: dict, source, metadata: dict, force: bool = False):
    """mlx-vlm's folder: its own weight and config writers, the processor and
    tokenizer files copied from the source (as mlx_vlm.convert copies them)."""
    from mlx_vlm.utils import save_config, save_weights

    with atomic_output(out, force=force) as tmp:
        save_weights(tmp, model)
        for pattern in ("*.py", "*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken"):
            for file in glob.glob(str(Path(source) / pattern)):
                if Path(file).name not in ("config.json", "model.safetensors.index.json", "optiq_metadata.json"):
                    shutil.copy(file, tmp)
        save_config(dict(config), config_path=tmp / "config.json")
        write_json(tmp / "optiq_metadata.json", metadata)
    return Path(out)


# -- multiple choice ------------------------------------------------------------


def choice_prompt(question: str, options) -> str:
    """AI2D's prompt as lmms-eval words it."""
    lines = [question] + [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)]
    return "\n".join(lines) + "\nAnswer with the option's letter from the given choices directly."


def letter_ids(processor, n: int) -> list:
    tokenizer = getattr(processor, "tokenizer", processor)
    ids = [tokenizer.encode(LETTERS[i], add_special_tokens=False) for i in range(n)]
    if any(len(t) != 1 for t in ids) or len({t[0] for t in ids}) != n:
        raise OptiqError("the tokenizer does not spell the option letters A-H as one token each")
    return [t[0] for t in ids]


def choices(model, processor, items) -> dict:
    """Multiple-choice accuracy: the option whose letter the model rates most
    likely as the first answer token."""
    picks, correct = [], 0
    letters = letter_ids(processor, max(len(options) for _, _, options, _ in items))
    for image, question, options, truth in items:
        sample = prepare(model, processor, image, chat_prompt(model, processor, choice_prompt(question, options)))
        logits = forward(model, sample)[0, -1]
        pick = int(np.argmax(np.asarray(logits[mx.array(letters[: len(options)])])))
        picks.append(pick)
        correct += pick == truth
    return {"accuracy": correct / len(items), "n_questions": len(items), "picks": picks}
