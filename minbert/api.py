"""Use a trained model from Python: ``minbert.load(path)`` returns an :class:`InferenceModel`.

    import minbert
    model = minbert.load("runs/main")                          # a run dir (its best/), a checkpoint, an export
    model.predict_sentiment(["a gripping, funny film"])        # array([3]): class ids 0..4
    model.predict_paraphrase([("How old are you?", "What is your age?")], return_probabilities=True)
    model.predict_similarity([("A man plays a guitar.", "A man is playing guitar.")])  # 0..5
    model.predict("stsbin", [("A man plays a guitar.", "A man is playing guitar.")])  # any task: docs/tasks.md
    model.encode(["a sentence"], normalize=True)               # (n, hidden) embeddings, the checkpoint's pooling

Every method takes a list of inputs and returns NumPy arrays in the order of the inputs. Inputs are batched
(sorted by length, so little padding) and run under ``torch.inference_mode()`` with the model in eval mode.

Task predictions go through the model's own batch building (``data.tensorize`` + ``TaskTensors.batch``, the
functions training and ``--predict_only`` use) and its ``forward(task, batch)``, so whatever a checkpoint's
configuration changes about how a task's inputs are encoded applies here too. The method names are the stable
interface; ``similarity`` is deliberately not one of them, because sentence-transformers' ``similarity`` compares
embeddings, while :meth:`InferenceModel.predict_similarity` is the STS head's 0..5 score of sentence pairs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from minbert.model.multitask import MultitaskBert, load_exported, resolve_checkpoint  # noqa: F401 (load_exported: API)
from minbert.model.pooling import pool
from minbert.model.tokenizer import load_tokenizer, pad_token_id, seq_length_problem
from minbert.tasks.data import TASKS, Example, TaskData, blank_text_problem, pad, sorted_batches, tensorize
from minbert.tasks.registry import TASKS as _REGISTRY, tasks_of_method
from minbert.training.precision import DEFAULT_BF16, resolve_bf16

# Class names of the sentiment tasks, indexed by class id (the SST labels of the CS224N data).
SENTIMENT_LABELS = {t: _REGISTRY[t].class_names for t in tasks_of_method("predict_sentiment")}
# The task each pair method predicts (tasks.TaskSpec.api_method).
(PARAPHRASE_TASK,) = tasks_of_method("predict_paraphrase")
(SIMILARITY_TASK,) = tasks_of_method("predict_similarity")
DEFAULT_BATCH_SIZE = 64


class MaxSeqLengthError(ValueError):
    """``max_seq_length`` outside 5..max_position_embeddings (the limits training applies)."""


class NonFiniteOutputError(ValueError):
    """The model gave NaN or infinite outputs: no prediction is returned rather than a meaningless one."""


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"device {name!r}: choose auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name}: no CUDA device is available")
    return torch.device(name)


def load(path: str | Path, device: str | torch.device = "auto", bf16: bool | str = DEFAULT_BF16,
         batch_size: int = DEFAULT_BATCH_SIZE, max_seq_length: int | None = None) -> "InferenceModel":
    """Load a trained model for inference.

    ``path``: a minbert checkpoint directory (``runs/main/best``), a training run's ``--output_dir`` (its
    ``best/`` is used), or a ``minbert-export`` folder (Hugging Face encoder + ``heads.safetensors``).
    ``bf16``: bfloat16 autocast for the forward passes (weights stay float32), as ``--bf16`` in training: True or
    ``"on"``, False or ``"off"``, or ``"auto"`` (the default: on where the device has native bfloat16).
    ``max_seq_length``: truncate longer inputs (default: the checkpoint tokenizer's limit, the training run's
    ``--max_seq_length``; an exported tokenizer has none, so 128, or the model's positions if fewer). Training's
    limits apply: 5 to max_position_embeddings, else :class:`MaxSeqLengthError` (a ValueError).
    Weights with a NaN or infinite value are refused (a DataError naming the file and tensor), and a prediction
    whose outputs are not finite raises :class:`NonFiniteOutputError` instead of returning an answer.
    """
    directory = resolve_checkpoint(path)
    if max_seq_length is not None:  # its type and lower limit, before any weights are read
        _check_max_seq_length(max_seq_length, None, "max_seq_length")
    model = MultitaskBert.load(directory)  # a minbert checkpoint or an export folder; weights checked finite
    limit = model.encoder.config.max_position_embeddings
    if max_seq_length is not None:
        _check_max_seq_length(max_seq_length, limit, "max_seq_length")
    elif (directory / "heads.safetensors").is_file():  # an exported tokenizer has no limit of its own
        max_seq_length = min(128, limit)
    tokenizer = load_tokenizer(directory, max_seq_length)
    _check_max_seq_length(tokenizer.truncation["max_length"], limit, f"{directory / 'tokenizer.json'}: its truncation")
    return InferenceModel(model, tokenizer, device=device, bf16=bf16, batch_size=batch_size)


def _check_max_seq_length(n, limit: int | None, what: str) -> None:
    problem = seq_length_problem(n, limit)
    if problem:
        raise MaxSeqLengthError(f"{what} {problem}")


def _check_finite_outputs(outputs: torch.Tensor, what: str) -> torch.Tensor:
    bad = ~torch.isfinite(outputs.reshape(len(outputs), -1)).all(dim=1)
    if bool(bad.any()):
        first = int(bad.nonzero()[0])
        raise NonFiniteOutputError(f"the model gives non-finite {what} (NaN or inf) for {int(bad.sum())} input(s), "
                                   f"the first is input {first}; no prediction returned")
    return outputs


class InferenceModel:
    """A trained MultitaskBert with its tokenizer, for prediction and sentence embeddings (see module docstring)."""

    def __init__(self, model: MultitaskBert, tokenizer, device: str | torch.device = "auto", bf16: bool | str = DEFAULT_BF16,
                 batch_size: int = DEFAULT_BATCH_SIZE):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.pad_id = pad_token_id(tokenizer)
        self.amp_dtype = torch.bfloat16 if resolve_bf16(bf16, self.device) == "on" else None
        self.batch_size = batch_size

    @property
    def tasks(self) -> list[str]:
        """The tasks the checkpoint has a head for."""
        return list(self.model.heads.keys())

    @property
    def pooling(self) -> str:
        return self.model.config.pooling

    @property
    def embedding_dim(self) -> int:
        return self.model.encoder.config.hidden_size

    # ---------------------------------------------------------------------------------------------- tasks
    def sentiment_task(self) -> str:
        """The checkpoint's sentiment task: ``sst`` (5 classes) if it has that head, else ``sst2`` (2 classes)."""
        for task in SENTIMENT_LABELS:
            if task in self.model.heads:
                return task
        raise ValueError(f"the checkpoint has no sentiment head (sst or sst2); its tasks: {', '.join(self.tasks)}")

    def predict_sentiment(self, sentences: Sequence[str], return_probabilities: bool = False,
                          task: str | None = None, batch_size: int | None = None):
        """Class ids (int array of shape (n,); names in ``SENTIMENT_LABELS[task]``); with
        ``return_probabilities``, the pair (class ids, softmax probabilities of shape (n, classes)).
        ``task``: ``sst`` or ``sst2`` (default: :meth:`sentiment_task`)."""
        task = task or self.sentiment_task()
        if task not in SENTIMENT_LABELS:
            raise ValueError(f"task {task!r} is not a sentiment task (choose from {', '.join(SENTIMENT_LABELS)})")
        texts = _texts(sentences)
        if not texts:
            empty = np.zeros(0, dtype=np.int64)
            return (empty, np.zeros((0, len(SENTIMENT_LABELS[task])), np.float32)) if return_probabilities else empty
        logits = self.head_outputs(task, [(s,) for s in texts], batch_size)
        labels = self.model.heads[task].predict(logits).numpy()
        if not return_probabilities:
            return labels
        return labels, torch.softmax(logits, dim=-1).numpy()

    def predict_paraphrase(self, pairs: Sequence[tuple[str, str]], return_probabilities: bool = False,
                           batch_size: int | None = None):
        """Is each (question, question) pair a paraphrase (bool array of shape (n,)); with
        ``return_probabilities``, the pair (decisions, probabilities of "paraphrase" of shape (n,))."""
        pairs = _pairs(pairs)
        if not pairs:
            return (np.zeros(0, bool), np.zeros(0, np.float32)) if return_probabilities else np.zeros(0, bool)
        logits = self.head_outputs(PARAPHRASE_TASK, pairs, batch_size)
        decisions = self.model.heads[PARAPHRASE_TASK].predict(logits).numpy().astype(bool)
        if not return_probabilities:
            return decisions
        return decisions, torch.sigmoid(logits).numpy()

    def predict_similarity(self, pairs: Sequence[tuple[str, str]], batch_size: int | None = None) -> np.ndarray:
        """The STS head's semantic similarity of each sentence pair on the 0..5 scale (float array of shape (n,))."""
        pairs = _pairs(pairs)
        if not pairs:
            return np.zeros(0, np.float32)
        outputs = self.head_outputs(SIMILARITY_TASK, pairs, batch_size)
        return self.model.heads[SIMILARITY_TASK].predict(outputs).numpy().astype(np.float32)

    def predict(self, task: str, inputs: Sequence, return_probabilities: bool = False,
                batch_size: int | None = None):
        """Predictions of any task the checkpoint has a head for, built-in or of the user's own (``--task_spec``,
        docs/tasks.md), as its prediction file holds them: class ids (int64) for a classification task, scores
        (float32, clipped to the task's range) for a regression task; shape (n,). ``inputs``: sentences for a
        single-sentence task, (sentence, sentence) pairs for a pair task. ``return_probabilities`` (classification
        only): the pair (class ids, class probabilities of shape (n, classes); of shape (n,), the probability of
        class 1, for a one-logit binary head such as qqp's)."""
        if task not in self.model.heads:
            raise ValueError(f"the checkpoint has no {task} head (it has: {', '.join(self.tasks)})")
        spec, head = TASKS[task], self.model.heads[task]
        if return_probabilities and spec.label_kind != "class":
            raise ValueError(f"{task} is a regression task: it has scores, no class probabilities")
        rows = _pairs(inputs) if spec.is_pair else [(t,) for t in _texts(inputs)]
        dtype = np.int64 if spec.label_kind == "class" else np.float32
        if not rows:
            shape = (0,) if head.kind == "binary" else (0, spec.num_labels)
            return (np.zeros(0, dtype), np.zeros(shape, np.float32)) if return_probabilities else np.zeros(0, dtype)
        outputs = self.head_outputs(task, rows, batch_size)
        predictions = head.predict(outputs).numpy().astype(dtype)
        if not return_probabilities:
            return predictions
        probabilities = torch.sigmoid(outputs) if head.kind == "binary" else torch.softmax(outputs, dim=-1)
        return predictions, probabilities.numpy()

    @torch.inference_mode()
    def head_outputs(self, task: str, inputs: list[tuple[str, ...]], batch_size: int | None = None) -> torch.Tensor:
        """The raw outputs of ``task``'s head (logits or scores, float32 on the CPU), one per input, in input
        order. Each input is a tuple of texts, one per text column of the task (one for sst, two for qqp/sts)."""
        if task not in self.model.heads:
            raise ValueError(f"the checkpoint has no {task} head (it has: {', '.join(self.tasks)})")
        spec = TASKS[task]
        if any(len(texts) != len(spec.text_columns) for texts in inputs):
            raise ValueError(f"{task} takes {len(spec.text_columns)} text(s) per input")
        if not inputs:
            raise ValueError("no inputs")
        examples = [Example(str(i), texts, None, i + 1) for i, texts in enumerate(inputs)]
        data = tensorize(TaskData(spec, "test", Path("<inputs>"), examples), self.tokenizer)
        out: list[torch.Tensor | None] = [None] * len(data)
        for idx in sorted_batches(data.lengths(), batch_size or self.batch_size):
            batch = {k: v.to(self.device) for k, v in data.batch(idx, self.pad_id).items()}
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                output = self.model(task, batch)
            for i, o in zip(idx, output.float().cpu()):
                out[i] = o
        return _check_finite_outputs(torch.stack(out), f"{task} outputs")

    # ---------------------------------------------------------------------------------------------- embeddings
    @torch.inference_mode()
    def encode(self, sentences: Sequence[str], normalize: bool = False, batch_size: int | None = None) -> np.ndarray:
        """Sentence embeddings, float32 array of shape (n, embedding_dim): the fine-tuned encoder's token states
        pooled as the checkpoint's heads see them (``pooling``: cls, mean or max). ``normalize``: unit L2 norm, so
        that dot products are cosine similarities."""
        texts = _texts(sentences)
        if not texts:
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        ids = [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=True)]
        out = torch.empty(len(texts), self.embedding_dim)
        for idx in sorted_batches([len(x) for x in ids], batch_size or self.batch_size):
            input_ids, mask = pad([ids[i] for i in idx], self.pad_id)
            batch = {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device)}
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                states = self.model.encoder.encode(self.model.embed_inputs(batch)[0], batch["attention_mask"])
                pooled = pool(states, batch["attention_mask"], self.pooling)
            out[idx] = pooled.float().cpu()
        _check_finite_outputs(out, "embeddings")
        if normalize:
            out = torch.nn.functional.normalize(out, dim=-1)
        return out.numpy()


def _texts(sentences: Sequence[str]) -> list[str]:
    if isinstance(sentences, str):
        raise TypeError("pass a list of sentences, not one string (wrap it: [text])")
    texts = list(sentences)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"sentence {i} is a {type(t).__name__}, not a str")
        problem = blank_text_problem(t)  # the rule of the task readers and minbert-predict
        if problem:
            raise ValueError(f"sentence {i} {problem}")
    return texts


def _pairs(pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    if isinstance(pairs, str) or (isinstance(pairs, tuple) and len(pairs) == 2 and all(isinstance(p, str) for p in pairs)):
        raise TypeError("pass a list of (sentence, sentence) pairs, e.g. [(a, b)]")
    out = []
    for i, pair in enumerate(pairs):
        if isinstance(pair, str) or len(pair) != 2:
            raise TypeError(f"pair {i} is not a (sentence, sentence) pair")
        for side, t in zip(("first", "second"), pair):
            if not isinstance(t, str):
                raise TypeError(f"pair {i}: the {side} sentence is a {type(t).__name__}, not a str")
            problem = blank_text_problem(t)
            if problem:
                raise ValueError(f"pair {i}: the {side} sentence {problem}")
        out.append((pair[0], pair[1]))
    return out
