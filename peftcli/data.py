"""Data: files or hub datasets -> tokenized examples -> padded batches.

Formats: `text` (language modelling on a text column), `alpaca` (instruction/input/output),
`chat` (`messages` with roles, rendered by the tokenizer's chat template), `classification`
(text + label column). For alpaca and chat the loss is on response tokens only (prompt = -100).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from peftcli.errors import UserError, one_line
from peftcli.recipe import DataCfg, DataFile

IGNORE = -100
LOADERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)
REQUIRED = {"alpaca": ["instruction", "output"], "chat": ["messages"]}


@dataclass
class Prepared:
    train: object
    eval: object | None
    eval_rows: list[dict] = field(default_factory=list)  # raw eval rows, for generation metrics
    label_names: list[str] | None = None
    dropped: int = 0  # rows with no response token left after truncation


def load_rows(df: DataFile, key: str, base_dir: Path | None = None):
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # parse failures are logged as errors: ours is the one line
    path = Path(df.path).expanduser()
    if not path.is_absolute() and base_dir is not None and not path.exists() and (base_dir / path).exists():
        path = base_dir / path
    suffix = path.suffix.lower()
    if path.exists() or suffix in LOADERS:
        if path.is_dir():
            raise UserError(f"{key}.path: {df.path} is a directory; give a data file ({', '.join(sorted(LOADERS))})")
        if not path.is_file():
            raise UserError(f"{key}.path: data file {df.path} not found (paths are relative to the current directory)")
        if suffix not in LOADERS:
            raise UserError(f"{key}.path: unsupported file type {suffix!r}; use one of {', '.join(sorted(LOADERS))}")
        kw = {"delimiter": "\t"} if suffix == ".tsv" else {}
        try:
            ds = datasets.load_dataset(LOADERS[suffix], data_files=str(path), split="train", keep_in_memory=True, **kw)
        except Exception as exc:  # datasets wraps parser errors in many types
            problem = _jsonl_problem(path) if path.suffix.lower() == ".jsonl" else None
            raise UserError(f"{key}.path: cannot parse {path}: {problem or _first_line(exc, root=True)}; fix the file") from None
    else:
        try:
            ds = datasets.load_dataset(df.path, split=df.split)
        except Exception as exc:
            raise UserError(f"{key}.path: {df.path} is neither a file nor a loadable dataset ({_first_line(exc, 150)})") from None
    if df.limit:
        ds = ds.select(range(min(df.limit, len(ds))))
    if len(ds) == 0:
        raise UserError(f"{key}.path: {df.path} has no rows")
    return ds


def _jsonl_problem(path: Path) -> str | None:
    """The first line of a JSON Lines file that is not a JSON object, as 'line N: why' (None if none is)."""
    import json

    try:
        with path.open("rb") as f:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw)
                except json.JSONDecodeError as exc:
                    return f"line {n}, column {exc.colno}: {one_line(exc.msg, 120)}"
                except ValueError as exc:  # bytes that are not UTF-8
                    return f"line {n}: {one_line(exc, 120)}"
                if not isinstance(row, dict):
                    return f"line {n}: a JSON {type(row).__name__}, expected an object with the columns as keys"
    except OSError:
        return None
    return None


def _first_line(exc: Exception, limit: int = 200, root: bool = False) -> str:
    """An exception's first non-empty line; its innermost cause's with `root` (datasets wraps the parser's
    error in "An error occurred while generating the dataset") or when the outer one says nothing."""
    while (root or not str(exc).strip()) and (exc.__cause__ or exc.__context__) is not None:
        exc = exc.__cause__ or exc.__context__
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return one_line(lines[0] if lines else type(exc).__name__, limit)


def _text_column(ds, df: DataFile, key: str) -> str:
    if df.text_column:
        if df.text_column not in ds.column_names:
            raise UserError(f"{key}.text_column: column {df.text_column!r} missing in {df.path} (columns: {', '.join(ds.column_names)})")
        return df.text_column
    for cand in ("text", "sentence", "content"):
        if cand in ds.column_names:
            return cand
    raise UserError(f"{key}: no text column in {df.path} (columns: {', '.join(ds.column_names)}); set {key}.text_column")


def _check_columns(ds, fmt: str, df: DataFile, key: str) -> None:
    missing = [c for c in REQUIRED.get(fmt, []) if c not in ds.column_names]
    if fmt == "classification" and df.label_column not in ds.column_names:
        missing.append(df.label_column)
    if missing:
        raise UserError(
            f"{key}: column(s) {', '.join(map(repr, missing))} missing for format {fmt!r} in {df.path} "
            f"(columns: {', '.join(ds.column_names)}); fix the file or set data.format"
        )


def _kind(value) -> str:
    return "null" if value is None else f"a {type(value).__name__}"


def check_rows(ds, fmt: str, df: DataFile, key: str, text_col: str | None = None) -> None:
    """Every row of `ds` has what its format renders (before any split, so row numbers are the file's,
    1-based): strings where text goes, a list of {role, content} messages for chat, a label."""
    where = lambda i: f"{key}: {df.path} row {i + 1}"  # noqa: E731
    if fmt == "alpaca":
        has_input = "input" in ds.column_names
        for i, (ins, out, inp) in enumerate(zip(ds["instruction"], ds["output"],
                                                ds["input"] if has_input else [None] * len(ds), strict=True)):
            for col, value in (("instruction", ins), ("output", out)):
                if not isinstance(value, str):
                    raise UserError(f"{where(i)}: '{col}' is {_kind(value)}, expected text; fix the row or drop it")
            if inp is not None and not isinstance(inp, str):
                raise UserError(f"{where(i)}: 'input' is {_kind(inp)}, expected text or null; fix the row or drop it")
    elif fmt == "chat":
        for i, messages in enumerate(ds["messages"]):
            if not isinstance(messages, list) or not messages:
                raise UserError(f"{where(i)}: 'messages' is {_kind(messages) if messages != [] else 'empty'}, expected a "
                                "list of {role, content} messages; fix the row or drop it")
            for j, m in enumerate(messages):
                if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                    raise UserError(f"{where(i)}: message {j + 1} is not a {{role, content}} pair of strings "
                                    f"(got {one_line(repr(m), 80)}); fix the row or drop it")
            if messages[0]["role"] == "assistant":
                raise UserError(f"{where(i)}: message 1 has role 'assistant'; a conversation starts with a system or user "
                                "message; fix the row or drop it")
            if not any(m["role"] == "assistant" for m in messages):
                raise UserError(f"{where(i)}: no message with role 'assistant', so nothing to learn; fix the row or drop it")
    elif fmt in ("text", "classification") and text_col is not None:
        for i, value in enumerate(ds[text_col]):
            # classification texts go through str() (a numeric column is fine); language modelling needs text
            if value is None or isinstance(value, dict | list) or (fmt == "text" and not isinstance(value, str)):
                raise UserError(f"{where(i)}: '{text_col}' is {_kind(value)}, expected text; fix the row or drop it")
        if fmt == "classification":
            for i, value in enumerate(ds[df.label_column]):
                if value is None or isinstance(value, dict | list):
                    raise UserError(f"{where(i)}: label '{df.label_column}' is {_kind(value)}, expected a class name "
                                    "or an integer id; fix the row or drop it")


class Renderer:
    """Turns a row into (prompt_ids, response_ids) so that training and generation share one template."""

    def __init__(self, tokenizer, cfg: DataCfg):
        self.tok = tokenizer
        template = cfg.template
        if template == "auto":
            template = "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"
        if template == "chat" and not getattr(tokenizer, "chat_template", None):
            raise UserError("data.template: chat, but the tokenizer has no chat template; use data.template: alpaca")
        self.template = template
        self.system = cfg.system_prompt
        formats = {cfg.format, cfg.train.format, cfg.eval.format if cfg.eval else None}
        if "chat" in formats and not getattr(tokenizer, "chat_template", None):
            key = "data.format" if cfg.format == "chat" else ("data.train.format" if cfg.train.format == "chat" else "data.eval.format")
            raise UserError(f"{key}: chat, but the tokenizer has no chat template to render messages; "
                            "use a model whose tokenizer has one, or convert the data to format alpaca")

    def _encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _chat(self, messages, add_generation_prompt: bool) -> list[int]:
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        return self._encode(text)

    def alpaca_messages(self, row: dict) -> list[dict]:
        user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return msgs + [{"role": "user", "content": user}]

    def prompt_ids(self, row: dict, fmt: str) -> list[int]:
        if fmt == "chat":
            return self._chat(row["messages"][:-1], True)
        if self.template == "chat":
            return self._chat(self.alpaca_messages(row), True)
        block = f"### Input:\n{row['input']}\n\n" if row.get("input") else ""
        prefix = f"{self.system}\n\n" if self.system else ""
        bos = [self.tok.bos_token_id] if self.tok.bos_token_id is not None else []
        return bos + self._encode(prefix + ALPACA_TEMPLATE.format(instruction=row["instruction"], input_block=block))

    def example(self, row: dict, fmt: str) -> tuple[list[int], list[int]]:
        """input_ids and labels (prompt masked)."""
        if fmt == "chat":
            return self._chat_example(row["messages"])
        prompt = self.prompt_ids(row, fmt)
        if self.template == "chat":
            full = self._chat(self.alpaca_messages(row) + [{"role": "assistant", "content": row["output"]}], False)
            n = _common_prefix(prompt, full)
            return full, [IGNORE] * n + full[n:]
        response = self._encode(row["output"]) + ([self.tok.eos_token_id] if self.tok.eos_token_id is not None else [])
        return prompt + response, [IGNORE] * len(prompt) + response

    def _chat_example(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        # Label each assistant turn: the tokens between the prompt up to it and the conversation through it.
        full = self._chat(messages, False)
        labels = [IGNORE] * len(full)
        for i, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            start = _common_prefix(self._chat(messages[:i], True), full)
            end = _common_prefix(self._chat(messages[: i + 1], False), full)
            labels[start:end] = full[start:end]
        return full, labels


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def label_mapping(ds, df: DataFile) -> list[str]:
    values = ds.unique(df.label_column)
    if all(isinstance(v, int) or (isinstance(v, str) and v.isdigit()) for v in values):
        return [str(i) for i in range(max(int(v) for v in values) + 1)]
    return sorted(str(v) for v in values)


def training_labels(cfg: DataCfg, base_dir: Path | None = None) -> list[str]:
    """The label names of a seq-cls recipe's training file, checked as prepare() checks it (for inspect)."""
    fmt = cfg.train.format or cfg.format
    if fmt != "classification":
        raise UserError(f"data.format: model.task seq-cls needs format classification (got {fmt!r})")
    ds = load_rows(cfg.train, "data.train", base_dir)
    _check_columns(ds, fmt, cfg.train, "data.train")
    check_rows(ds, fmt, cfg.train, "data.train", _text_column(ds, cfg.train, "data.train"))
    return label_mapping(ds, cfg.train)


def split_eval(ds, cfg: DataCfg, seed: int):
    """Hold out data.eval_ratio of the training rows; both parts must keep at least one row."""
    n = len(ds)
    n_eval = math.ceil(cfg.eval_ratio * n)
    if n < 2 or n_eval >= n:
        raise UserError(f"data.eval_ratio: {cfg.eval_ratio} of {n} row(s) in {cfg.train.path} leaves no rows to train on; "
                        "use more data, a smaller data.eval_ratio, or a separate data.eval file")
    try:
        split = ds.train_test_split(test_size=cfg.eval_ratio, seed=seed)
    except ValueError as exc:
        raise UserError(f"data.eval_ratio: cannot split {n} row(s) of {cfg.train.path}: {_first_line(exc)}; "
                        "use more data or a separate data.eval file") from None
    return split["train"], split["test"]


def prepare(cfg: DataCfg, tokenizer, task: str, seed: int = 42, base_dir: Path | None = None,
            label_names: list[str] | None = None) -> Prepared:
    fmt_of = lambda df: df.format or cfg.format  # noqa: E731
    train_ds = load_rows(cfg.train, "data.train", base_dir)
    eval_ds = load_rows(cfg.eval, "data.eval", base_dir) if cfg.eval else None
    if task == "seq-cls" and fmt_of(cfg.train) != "classification":
        raise UserError(f"data.format: model.task seq-cls needs format classification (got {fmt_of(cfg.train)!r})")
    if task == "causal-lm" and fmt_of(cfg.train) == "classification":
        raise UserError("data.format: classification data needs model.task: seq-cls")
    for ds, df, key in ((train_ds, cfg.train, "data.train"), (eval_ds, cfg.eval, "data.eval")):
        if ds is not None:
            _check_columns(ds, fmt_of(df), df, key)
            text_col = _text_column(ds, df, key) if fmt_of(df) in ("text", "classification") else None
            check_rows(ds, fmt_of(df), df, key, text_col)
    # labels are named from all training rows, before an eval split can hide a rare one
    names = (label_names or label_mapping(train_ds, cfg.train)) if task == "seq-cls" else None
    was_split = eval_ds is None and bool(cfg.eval_ratio)  # rows shuffled: their indices are not the file's rows
    if was_split:
        train_ds, eval_ds = split_eval(train_ds, cfg, seed)
    eval_df = cfg.eval or cfg.train

    if task == "seq-cls":
        to_id = {n: i for i, n in enumerate(names)}

        def encode_cls(ds, df, key):
            col = _text_column(ds, df, key)
            texts, labels = ds[col], ds[df.label_column]
            bad = sorted({str(v) for v in labels if str(v) not in to_id})
            if bad:
                raise UserError(f"{key}: label(s) {bad[:5]} in {df.path} are not among the training labels {names}")
            enc = tokenizer([str(t) for t in texts], truncation=True, max_length=cfg.max_length)
            return [{"input_ids": ids, "labels": to_id[str(y)]} for ids, y in zip(enc["input_ids"], labels, strict=True)]

        train = encode_cls(train_ds, cfg.train, "data.train")
        evals = encode_cls(eval_ds, eval_df, "data.eval") if eval_ds is not None else None
        return Prepared(train, evals, label_names=names)

    from jinja2 import TemplateError

    renderer = Renderer(tokenizer, cfg)

    def encode_lm(ds, df, key):
        fmt = fmt_of(df)
        out, dropped = [], 0
        if fmt == "text":
            col = _text_column(ds, df, key)
            eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
            for ids in tokenizer(list(ds[col]), add_special_tokens=True)["input_ids"]:
                ids = (ids + eos)[: cfg.max_length]
                out.append({"input_ids": ids, "labels": list(ids)})
            return out, 0
        for i, row in enumerate(ds):
            try:
                ids, labels = renderer.example(row, fmt)
            except (ValueError, TypeError, TemplateError) as exc:  # the tokenizer's chat template rejects the row
                which = f"a row of {df.path}" if was_split else f"{df.path} row {i + 1}"
                fix = "fix the row" if fmt == "chat" else "fix the row, or set data.template: alpaca"
                raise UserError(f"{key}: {which}: the tokenizer's chat template rejects it ({_first_line(exc, 150)}); {fix}") from None
            ids, labels = ids[: cfg.max_length], labels[: cfg.max_length]
            if all(label == IGNORE for label in labels):
                dropped += 1  # the prompt alone fills max_length: nothing to learn from this row
                continue
            out.append({"input_ids": ids, "labels": labels})
        if not out:
            raise UserError(f"{key}: every row is longer than data.max_length={cfg.max_length} before its response; raise data.max_length")
        return out, dropped

    train, dropped = encode_lm(train_ds, cfg.train, "data.train")
    evals, eval_rows = None, []
    if eval_ds is not None:
        evals, _ = encode_lm(eval_ds, eval_df, "data.eval")
        if fmt_of(eval_df) in ("alpaca", "chat"):
            eval_rows = [dict(r) for r in eval_ds]
    return Prepared(train, evals, eval_rows=eval_rows, dropped=dropped)


class Collator:
    """Dynamic padding (to the longest in the batch) or fixed padding to max_length."""

    def __init__(self, pad_id: int, pad_to: int | None = None):
        self.pad_id = pad_id
        self.pad_to = pad_to

    def __call__(self, batch: list[dict]) -> dict:
        n = self.pad_to or max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        seq_labels = isinstance(batch[0]["labels"], list)
        labels = torch.full((len(batch), n), IGNORE, dtype=torch.long) if seq_labels else None
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k] = torch.tensor(b["input_ids"])
            mask[i, :k] = 1
            if seq_labels:
                labels[i, :k] = torch.tensor(b["labels"])
        if not seq_labels:
            labels = torch.tensor([b["labels"] for b in batch])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
