"""Data: files or hub datasets -> tokenized examples -> padded (or packed) batches.

Formats: `text` (language modelling on a text column), `alpaca` (instruction/input/output),
`chat` (`messages` with roles, rendered by the tokenizer's chat template), `sharegpt` (`conversations`
of {from, value} turns, read into chat messages), `classification` (text + label column). For alpaca,
chat and sharegpt the loss is on response tokens only (prompt = -100). A file's own column names map
onto these roles with `columns` (as LLaMA-Factory's dataset_info does); several training files mix by
weight; `data.packing` concatenates rows into max_length blocks (causal LMs); `model.task: seq2seq`
encodes alpaca-shaped rows as source (prompt) -> target (response).
"""

from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from peftcli.errors import UserError, one_line
from peftcli.recipe import DataCfg, DataFile, ShareGPTTags

IGNORE = -100
LOADERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)
REQUIRED = {"alpaca": ["instruction", "output"], "chat": ["messages"], "sharegpt": ["conversations"]}
# columns.<role>: the column each role is read from under its peftcli name (text and label are looked up, not renamed)
ROLES = {"prompt": "instruction", "query": "input", "response": "output", "system": "system", "messages": "messages",
         "text": None, "label": None}
CHAT = ("chat", "sharegpt")  # rendered with the chat template; sharegpt rows are read into chat messages


@dataclass
class Prepared:
    train: object
    eval: object | None
    eval_rows: list[dict] = field(default_factory=list)  # raw eval rows, for generation metrics
    label_names: list[str] | None = None
    dropped: int = 0  # rows with no response token left after truncation
    rows: int = 0  # training rows (after weighting); len(train) counts blocks when packed


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
        if df.config:
            raise UserError(f"{key}.config: {df.config!r} selects a hub dataset's configuration, but {df.path} is a local file; "
                            f"remove {key}.config")
        kw = {"delimiter": "\t"} if suffix == ".tsv" else {}
        try:
            ds = datasets.load_dataset(LOADERS[suffix], data_files=str(path), split="train", keep_in_memory=True, **kw)
        except Exception as exc:  # datasets wraps parser errors in many types
            problem = _jsonl_problem(path) if path.suffix.lower() == ".jsonl" else None
            raise UserError(f"{key}.path: cannot parse {path}: {problem or _first_line(exc, root=True)}; fix the file") from None
    else:
        try:
            ds = datasets.load_dataset(df.path, name=df.config, split=df.split)
        except Exception as exc:  # no network, unknown name/config/split: datasets raises many types
            which = f"{df.path} (config {df.config}, split {df.split})" if df.config else f"{df.path} (split {df.split})"
            raise UserError(f"{key}.path: {which} is neither a local file nor a dataset that loads from the hub "
                            f"({_first_line(exc, 150)}); check the path, {key}.config and {key}.split, or the network") from None
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


def label_column(df: DataFile) -> str:
    return (df.columns or {}).get("label") or df.label_column


def _text_column(ds, df: DataFile, key: str) -> str:
    mapped = (df.columns or {}).get("text")
    if mapped and df.text_column and mapped != df.text_column:
        raise UserError(f"{key}.columns.text ({mapped!r}) and {key}.text_column ({df.text_column!r}) disagree; keep columns.text")
    name, where = (mapped, "columns.text") if mapped else (df.text_column, "text_column")
    if name:
        if name not in ds.column_names:
            raise UserError(f"{key}.{where}: column {name!r} missing in {df.path} (columns: {', '.join(ds.column_names)})")
        return name
    for cand in ("text", "sentence", "content"):
        if cand in ds.column_names:
            return cand
    raise UserError(f"{key}: no text column in {df.path} (columns: {', '.join(ds.column_names)}); set {key}.columns.text")


def map_columns(ds, df: DataFile, key: str, fmt: str):
    """Rename the file's columns named in `columns` to the names its format reads (question -> instruction)."""
    cols = df.columns or {}
    have = ds.column_names
    for role, col in cols.items():
        if role not in ROLES:
            raise UserError(f"{key}.columns.{one_line(role, 40)}: unknown role; roles are {', '.join(ROLES)} "
                            f"(columns of {df.path}: {', '.join(have)})")
        if col not in have:
            raise UserError(f"{key}.columns.{role}: column {one_line(repr(col), 60)} missing in {df.path} "
                            f"(columns: {', '.join(have)})")
    target = {role: ("conversations" if role == "messages" and fmt == "sharegpt" else name)
              for role, name in ROLES.items() if name}
    rename = {col: target[role] for role, col in cols.items() if role in target and col != target[role]}
    if len(set(rename)) < len([r for r in cols if r in target and cols[r] != target[r]]):
        raise UserError(f"{key}.columns: one column mapped to two roles ({', '.join(f'{r}: {c}' for r, c in cols.items())}); "
                        "give each role its own column")
    if rename:
        shadowed = [c for c in rename.values() if c in have and c not in rename]  # the file's own 'output' when response: answer
        ds = ds.remove_columns(shadowed).rename_columns(rename)
    return ds


def _shown(df: DataFile, col: str) -> str:
    """A column as the file names it (the user's 'answer', not the 'output' it was renamed to)."""
    for role, file_col in (df.columns or {}).items():
        if ROLES.get(role) == col or (role == "messages" and col == "conversations"):
            return file_col
    return col


def _check_columns(ds, fmt: str, df: DataFile, key: str) -> None:
    missing = [_shown(df, c) for c in REQUIRED.get(fmt, []) if c not in ds.column_names]
    if fmt == "classification" and label_column(df) not in ds.column_names:
        missing.append(label_column(df))
    if missing:
        roles = {"alpaca": "{prompt: ..., response: ...}", "chat": "{messages: ...}", "sharegpt": "{messages: ...}",
                 "classification": "{text: ..., label: ...}"}.get(fmt)
        hint = f", map the file's columns with {key}.columns {roles}" if roles else ""
        raise UserError(
            f"{key}: column(s) {', '.join(map(repr, missing))} missing for format {fmt!r} in {df.path} "
            f"(columns: {', '.join(ds.column_names)}); fix the file{hint} or set data.format"
        )


def sharegpt_to_chat(ds, df: DataFile, key: str):
    """ShareGPT rows ({from, value} turns under `conversations`, an optional `system` column) as chat
    `messages`; an unknown role tag names the file, row and turn."""
    t = df.tags or ShareGPTTags()
    roles = {"user": "user", "assistant": "assistant", "system": "system", "tool": "tool",
             t.user_tag: "user", t.assistant_tag: "assistant", t.system_tag: "system",
             t.observation_tag: "tool", t.function_tag: "assistant"}
    systems = ds["system"] if "system" in ds.column_names else [None] * len(ds)
    conv_col = _shown(df, "conversations")
    out = []
    for i, (conv, system) in enumerate(zip(ds["conversations"], systems, strict=True)):
        where = f"{key}: {df.path} row {i + 1}"
        if not isinstance(conv, list) or not conv:
            raise UserError(f"{where}: '{conv_col}' is {_kind(conv) if conv != [] else 'empty'}, expected a list of "
                            f"{{{t.role_tag}, {t.content_tag}}} turns; fix the row or drop it")
        messages = [{"role": "system", "content": system}] if isinstance(system, str) and system else []
        for j, turn in enumerate(conv):
            if not (isinstance(turn, dict) and isinstance(turn.get(t.role_tag), str) and isinstance(turn.get(t.content_tag), str)):
                raise UserError(f"{where}: turn {j + 1} is not a {{{t.role_tag}, {t.content_tag}}} pair of strings "
                                f"(got {one_line(repr(turn), 80)}); fix the row, or set {key}.tags.role_tag / content_tag")
            tag = turn[t.role_tag]
            if tag not in roles:
                raise UserError(f"{where}: turn {j + 1} has role tag {one_line(repr(tag), 40)}, not one of "
                                f"{', '.join(dict.fromkeys(roles))}; map it with {key}.tags (user_tag, assistant_tag, "
                                "system_tag, observation_tag, function_tag)")
            messages.append({"role": roles[tag], "content": turn[t.content_tag]})
        out.append(messages)
    import datasets

    kept = {c: ds[c] for c in ds.column_names if c not in ("conversations", "messages", "system")}
    return datasets.Dataset.from_dict({**kept, "messages": out})


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
                    raise UserError(f"{where(i)}: '{_shown(df, col)}' is {_kind(value)}, expected text; fix the row or drop it")
            if inp is not None and not isinstance(inp, str):
                raise UserError(f"{where(i)}: '{_shown(df, 'input')}' is {_kind(inp)}, expected text or null; fix the row or drop it")
    elif fmt in CHAT:
        name = "'messages'" if fmt == "chat" else f"'{_shown(df, 'conversations')}' (read as chat messages)"
        for i, messages in enumerate(ds["messages"]):
            if not isinstance(messages, list) or not messages:
                raise UserError(f"{where(i)}: {name} is {_kind(messages) if messages != [] else 'empty'}, expected a "
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
            col = label_column(df)
            for i, value in enumerate(ds[col]):
                if value is None or isinstance(value, dict | list):
                    raise UserError(f"{where(i)}: label '{col}' is {_kind(value)}, expected a class name "
                                    "or an integer id; fix the row or drop it")


class Renderer:
    """Turns a row into (prompt_ids, response_ids) so that training and generation share one template."""

    def __init__(self, tokenizer, cfg: DataCfg, task: str = "causal-lm"):
        self.tok = tokenizer
        template = cfg.template
        if template == "auto":
            template = "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"
        if template == "chat" and not getattr(tokenizer, "chat_template", None):
            raise UserError("data.template: chat, but the tokenizer has no chat template; use data.template: alpaca")
        self.template = template
        self.system = cfg.system_prompt
        self.max_length = cfg.max_length
        self.seq2seq = task == "seq2seq"
        if self.seq2seq:
            return  # source and target are plain text: no templates
        files = [("data.format", cfg.format), *((f"data.train{_index(cfg, i)}.format", df.format)
                                                 for i, df in enumerate(cfg.train_files))]
        files += [("data.eval.format", cfg.eval.format)] if cfg.eval else []
        chat = [(key, fmt) for key, fmt in files if fmt in CHAT]
        if chat and not getattr(tokenizer, "chat_template", None):
            raise UserError(f"{chat[0][0]}: {chat[0][1]}, but the tokenizer has no chat template to render messages; "
                            "use a model whose tokenizer has one, or convert the data to format alpaca")

    def _encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _chat(self, messages, add_generation_prompt: bool) -> list[int]:
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        return self._encode(text)

    def _system(self, row: dict) -> str | None:
        return row.get("system") or self.system  # a file's system column (columns.system) wins over data.system_prompt

    def alpaca_messages(self, row: dict) -> list[dict]:
        user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        msgs = [{"role": "system", "content": self._system(row)}] if self._system(row) else []
        return msgs + [{"role": "user", "content": user}]

    def prompt_ids(self, row: dict, fmt: str) -> list[int]:
        if self.seq2seq:  # the encoder's input: the prompt as plain text, with the tokenizer's special tokens
            text = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
            system = self._system(row)
            return self.tok(f"{system}\n\n{text}" if system else text, truncation=True, max_length=self.max_length)["input_ids"]
        if fmt in CHAT:
            return self._chat(row["messages"][:-1], True)
        if self.template == "chat":
            return self._chat(self.alpaca_messages(row), True)
        block = f"### Input:\n{row['input']}\n\n" if row.get("input") else ""
        prefix = f"{self._system(row)}\n\n" if self._system(row) else ""
        bos = [self.tok.bos_token_id] if self.tok.bos_token_id is not None else []
        return bos + self._encode(prefix + ALPACA_TEMPLATE.format(instruction=row["instruction"], input_block=block))

    def example(self, row: dict, fmt: str) -> tuple[list[int], list[int]]:
        """input_ids and labels (prompt masked; seq2seq: the target's ids)."""
        if self.seq2seq:
            return self.prompt_ids(row, fmt), self.tok(row["output"], truncation=True, max_length=self.max_length)["input_ids"]
        if fmt in CHAT:
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
    return label_names_of([(ds, df)])


def label_names_of(parts) -> list[str]:
    """Class names from the label columns of (dataset, file) pairs: 0..max for integer ids, else sorted names."""
    values = {v for ds, df in parts for v in ds.unique(label_column(df))}
    if all(isinstance(v, int) or (isinstance(v, str) and v.isdigit()) for v in values):
        return [str(i) for i in range(max(int(v) for v in values) + 1)]
    return sorted(str(v) for v in values)


def _index(cfg: DataCfg, i: int) -> str:
    """The key suffix of training file i: data.train.1 in a list, data.train alone."""
    return f".{i}" if isinstance(cfg.train, list) else ""


def read_file(df: DataFile, key: str, fmt: str, base_dir: Path | None = None):
    """A file's rows, its columns mapped to the format's names and every row checked; ShareGPT rows read
    into chat messages. Returns (dataset, text column or None)."""
    ds = map_columns(load_rows(df, key, base_dir), df, key, fmt)
    _check_columns(ds, fmt, df, key)
    if fmt == "sharegpt":
        ds = sharegpt_to_chat(ds, df, key)
    text_col = _text_column(ds, df, key) if fmt in ("text", "classification") else None
    check_rows(ds, fmt, df, key, text_col)
    return ds, text_col


def check_task(task: str, fmt: str, key: str) -> None:
    if task == "seq-cls" and fmt != "classification":
        raise UserError(f"data.format: model.task seq-cls needs format classification (got {fmt!r})")
    if task != "seq-cls" and fmt == "classification":
        raise UserError("data.format: classification data needs model.task: seq-cls")
    if task == "seq2seq" and fmt != "alpaca":
        raise UserError(f"{key}.format: model.task seq2seq reads source/target rows, format alpaca (source = prompt and "
                        f"query, target = response; map other column names with {key}.columns), got {fmt!r}")


def training_labels(cfg: DataCfg, base_dir: Path | None = None) -> list[str]:
    """The label names of a seq-cls recipe's training files, checked as prepare() checks them (for inspect)."""
    parts = []
    for i, df in enumerate(cfg.train_files):
        key, fmt = f"data.train{_index(cfg, i)}", df.format or cfg.format
        check_task("seq-cls", fmt, key)
        parts.append((read_file(df, key, fmt, base_dir)[0], df))
    return label_names_of(parts)


def split_eval(ds, cfg: DataCfg, seed: int, df: DataFile | None = None):
    """Hold out data.eval_ratio of the training rows; both parts must keep at least one row."""
    path = (df or cfg.first_train).path
    n = len(ds)
    n_eval = math.ceil(cfg.eval_ratio * n)
    if n < 2 or n_eval >= n:
        raise UserError(f"data.eval_ratio: {cfg.eval_ratio} of {n} row(s) in {path} leaves no rows to train on; "
                        "use more data, a smaller data.eval_ratio, or a separate data.eval file")
    try:
        split = ds.train_test_split(test_size=cfg.eval_ratio, seed=seed)
    except ValueError as exc:
        raise UserError(f"data.eval_ratio: cannot split {n} row(s) of {path}: {_first_line(exc)}; "
                        "use more data or a separate data.eval file") from None
    return split["train"], split["test"]


def weighted(examples: list[dict], weight: float, rng: random.Random, key: str) -> list[dict]:
    """A file's examples by its weight, a repeat factor: int(weight) copies of every row plus a seeded sample
    (without replacement) of the fraction left, so 2.5 = every row twice and half of them a third time."""
    whole = int(weight)
    k = round((weight - whole) * len(examples))
    out = examples * whole + [examples[i] for i in sorted(rng.sample(range(len(examples)), k))]
    if not out:
        raise UserError(f"{key}.weight: {weight} of {len(examples)} row(s) keeps none; raise the weight")
    return out


def pack(examples: list[dict], max_length: int, seed: int) -> list[dict]:
    """Causal-LM rows packed into blocks of at most max_length tokens by best-fit decreasing (longest row
    first, into the fullest block it fits; a row never spans two blocks), the blocks in a seeded order.
    position_ids restart at every row, which is what keeps attention inside it (peftcli.loss runs attention
    per segment), and a row's first label is dropped: the previous row's last token would predict it, and
    in an unpacked batch no position predicts a row's first token either."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))  # stable: ties in file order
    blocks: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens left, block), sorted: the first that fits is the fullest
    for i in order:
        k = len(examples[i]["input_ids"])
        j = bisect.bisect_left(free, (k, -1))
        if j < len(free):
            left, b = free.pop(j)
        else:
            left, b = max_length, len(blocks)
            blocks.append([])
        blocks[b].append(i)
        if left > k:
            bisect.insort(free, (left - k, b))
    random.Random(seed).shuffle(blocks)
    return [_block([examples[i] for i in b]) for b in blocks]


def _block(rows: list[dict]) -> dict:
    ids, labels, positions = [], [], []
    for r in rows:
        ids += r["input_ids"]
        labels += [IGNORE] + r["labels"][1:]
        positions += range(len(r["input_ids"]))
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def prepare(cfg: DataCfg, tokenizer, task: str, seed: int = 42, base_dir: Path | None = None,
            label_names: list[str] | None = None) -> Prepared:
    fmt_of = lambda df: df.format or cfg.format  # noqa: E731
    files = [(df, f"data.train{_index(cfg, i)}") for i, df in enumerate(cfg.train_files)]
    for df, key in files:
        check_task(task, fmt_of(df), key)
    if cfg.packing and task != "causal-lm":
        raise UserError(f"data.packing: concatenates rows for causal LMs; model.task is {task}, set data.packing: false")
    parts = [(*read_file(df, key, fmt_of(df), base_dir), df, key) for df, key in files]
    held = [(*read_file(cfg.eval, "data.eval", fmt_of(cfg.eval), base_dir), cfg.eval, "data.eval")] if cfg.eval else []
    # labels are named from all training rows, before an eval split can hide a rare one
    names = (label_names or label_names_of([(ds, df) for ds, _, df, _ in parts])) if task == "seq-cls" else None
    was_split = not held and bool(cfg.eval_ratio)  # rows shuffled: their indices are not the file's rows
    if was_split:  # each file gives its share: a rare file is not left out of the eval
        for i, (ds, text_col, df, key) in enumerate(parts):
            train_ds, eval_ds = split_eval(ds, cfg, seed, df)
            parts[i] = (train_ds, text_col, df, key)
            held.append((eval_ds, text_col, df, key))
    encode = _encoder(cfg, tokenizer, task, names, was_split)

    train, dropped, rng = [], 0, random.Random(seed)
    for ds, text_col, df, key in parts:
        examples, n_dropped = encode(ds, text_col, df, key)
        train += weighted(examples, df.weight, rng, key) if df.weight != 1 else examples
        dropped += n_dropped
    evals, eval_rows = [], []
    gen_fmt = {"sharegpt": "chat"}.get(fmt_of(held[0][2]), fmt_of(held[0][2])) if held else None
    for ds, text_col, df, key in held:
        evals += encode(ds, text_col, df, key)[0]
        if task != "seq-cls" and {"sharegpt": "chat"}.get(fmt_of(df), fmt_of(df)) == gen_fmt and gen_fmt in ("alpaca", "chat"):
            eval_rows += [dict(r) for r in ds]  # reference rows for generation eval, in one format
    rows = len(train)
    if cfg.packing:
        train = pack(train, cfg.max_length, seed)
    return Prepared(train, evals if held else None, eval_rows=eval_rows, label_names=names, dropped=dropped, rows=rows)


def _encoder(cfg: DataCfg, tokenizer, task: str, names: list[str] | None, was_split: bool):
    """encode(dataset, text column, file, key) -> (examples, rows dropped) for the task."""
    if task == "seq-cls":
        to_id = {n: i for i, n in enumerate(names)}

        def encode_cls(ds, text_col, df, key):
            texts, labels = ds[text_col], ds[label_column(df)]
            bad = sorted({str(v) for v in labels if str(v) not in to_id})
            if bad:
                raise UserError(f"{key}: label(s) {bad[:5]} in {df.path} are not among the training labels {names}")
            enc = tokenizer([str(t) for t in texts], truncation=True, max_length=cfg.max_length)
            return [{"input_ids": ids, "labels": to_id[str(y)]} for ids, y in zip(enc["input_ids"], labels, strict=True)], 0

        return encode_cls

    from jinja2 import TemplateError

    renderer = Renderer(tokenizer, cfg, task)

    def encode_lm(ds, text_col, df, key):
        fmt = df.format or cfg.format
        out, dropped = [], 0
        if fmt == "text":
            eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
            for ids in tokenizer(list(ds[text_col]), add_special_tokens=True)["input_ids"]:
                ids = (ids + eos)[: cfg.max_length]
                out.append({"input_ids": ids, "labels": list(ids)})
            return out, 0
        for i, row in enumerate(ds):
            try:
                ids, labels = renderer.example(row, fmt)
            except (ValueError, TypeError, TemplateError) as exc:  # the tokenizer's chat template rejects the row
                which = f"a row of {df.path}" if was_split else f"{df.path} row {i + 1}"
                fix = "fix the row" if fmt in CHAT else "fix the row, or set data.template: alpaca"
                raise UserError(f"{key}: {which}: the tokenizer's chat template rejects it ({_first_line(exc, 150)}); {fix}") from None
            if task == "seq2seq":  # every target token is a loss term (the decoder is fed the shifted target)
                out.append({"input_ids": ids, "labels": labels, "seq2seq": True})
                continue
            ids, labels = ids[: cfg.max_length], labels[: cfg.max_length]
            if all(label == IGNORE for label in labels):
                dropped += 1  # the prompt alone fills max_length: nothing to learn from this row
                continue
            out.append({"input_ids": ids, "labels": labels})
        if not out:
            raise UserError(f"{key}: every row is longer than data.max_length={cfg.max_length} before its response; raise data.max_length")
        return out, dropped

    return encode_lm


class Collator:
    """Dynamic padding (to the longest in the batch) or fixed padding to max_length; packed blocks
    (data.packing) go out as one row of real tokens with their position_ids, no padding at all."""

    def __init__(self, pad_id: int, pad_to: int | None = None):
        self.pad_id = pad_id
        self.pad_to = pad_to

    def __call__(self, batch: list[dict]) -> dict:
        if "position_ids" in batch[0]:
            row = lambda k: torch.tensor([[t for b in batch for t in b[k]]])  # noqa: E731
            ids = row("input_ids")
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": row("labels"),
                    "position_ids": row("position_ids")}
        n = self.pad_to or max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        seq_labels = isinstance(batch[0]["labels"], list)
        # seq2seq targets have their own length; causal-LM labels line up with input_ids
        n_labels = max(len(b["labels"]) for b in batch) if batch[0].get("seq2seq") else n
        labels = torch.full((len(batch), n_labels), IGNORE, dtype=torch.long) if seq_labels else None
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k] = torch.tensor(b["input_ids"])
            mask[i, :k] = 1
            if seq_labels:
                labels[i, :len(b["labels"])] = torch.tensor(b["labels"])
        if not seq_labels:
            labels = torch.tensor([b["labels"] for b in batch])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
