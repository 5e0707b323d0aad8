import json

import pytest

from icm_lora.tasks import (
    TaskSpec,
    TextBudget,
    chunk_lines,
    fingerprint,
    load_documents,
    load_task_file,
    resolve_data_files,
    split_task,
)


def test_splits_are_disjoint_documents_within_budget(task_specs):
    budget = TextBudget(train_chars=2000, val_chars=300, test_chars=300, num_demos=3, demo_chars=50)
    task = split_task(task_specs[0], budget)
    assert len(task.val) <= 300 + 2 * 40 and len(task.test) <= 300 + 2 * 40  # plus joining blank lines
    assert sum(map(len, task.train)) == 2000
    assert len(task.demos) == 3 and all(len(d) <= 50 for d in task.demos)
    train_docs = set(task.train)
    for held_out in task.val.split("\n\n") + task.test.split("\n\n"):
        assert held_out not in train_docs
    assert split_task(task_specs[0], budget) == task  # deterministic


def test_where_filters_and_front_matter(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [{"text": "---\nkey: 1\n---\nbody one", "kind": "cs.LG stat.ML"}, {"text": "body two", "kind": "math.PR"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    spec = TaskSpec("t", builder="json", data_files=str(path), where={"kind": "cs.LG*"}, strip_front_matter=True)
    assert load_documents(spec) == ["body one"]
    assert load_documents(TaskSpec("t", builder="json", data_files=str(path), where={"kind": "math.PR"})) == ["body two"]
    listed = tmp_path / "listed.jsonl"
    listed.write_text(json.dumps({"text": "x", "cats": ["stat.ML", "cs.LG"]}) + "\n" + json.dumps({"text": "y", "cats": ["cs.LG"]}))
    assert load_documents(TaskSpec("t", builder="json", data_files=str(listed), where={"cats": "cs.LG*"})) == ["y"]


def test_json_mapping_builder(tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"A": {"extract": "alpha", "topic": "x"}, "B": {"extract": "beta", "topic": "y"}}))
    spec = TaskSpec("t", builder="json_mapping", data_files=str(path), text_field="extract", where={"topic": "y"})
    assert load_documents(spec) == ["beta"]


def test_empty_task_names_the_task_and_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text(json.dumps({"text": "   "}) + "\n")
    with pytest.raises(ValueError, match=r"task 'nothing' is empty.*empty.jsonl"):
        load_documents(TaskSpec("nothing", builder="json", data_files=str(path)))
    with pytest.raises(KeyError, match="no column 'body'"):
        load_documents(TaskSpec("t", builder="json", data_files=str(path), text_field="body"))


def test_too_little_text_for_a_split(tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"text": "only one document"}) + "\n")
    with pytest.raises(ValueError, match="'short' has too little text"):
        split_task(TaskSpec("short", builder="json", data_files=str(path)), TextBudget())


def test_placeholders_resolve_and_missing_files_are_named(tmp_path):
    assert resolve_data_files("{stdlib}/json/__init__.py")[0].endswith("json/__init__.py")
    assert resolve_data_files("{include}/Python.h")[0].endswith("Python.h")  # this Python's C headers
    assert resolve_data_files("{pkg:pytest}/__init__.py")
    with pytest.raises(FileNotFoundError, match="nope"):
        resolve_data_files(str(tmp_path / "nope*.txt"))
    with pytest.raises(ModuleNotFoundError, match="no_such_pkg"):
        resolve_data_files("{pkg:no_such_pkg}/x")


def test_task_file_validation(tmp_path):
    good = tmp_path / "t.yaml"
    good.write_text("name: new\ndescription: something\nexamples: [a, b]\n")
    assert load_task_file(good)["examples"] == ["a", "b"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: new\n")
    with pytest.raises(ValueError, match="bad.yaml.*examples"):
        load_task_file(bad)


def test_chunk_lines_keeps_every_line_in_order():
    text = "\n".join(f"line {i:03d} " + "x" * (i % 7) for i in range(200))
    pieces = chunk_lines(text, 100)
    assert all(len(p) <= 100 for p in pieces) and len(pieces) > 10
    assert "\n".join(pieces).split("\n") == text.split("\n")  # nothing lost, nothing reordered
    long_line = chunk_lines("a" * 250, 100)
    assert [len(p) for p in long_line] == [100, 100, 50]


def test_big_files_are_chunked_into_documents_and_line_lists_joined(tmp_path):
    big = tmp_path / "bible.txt"
    big.write_text("\n".join(f"verse {i} and it came to pass" for i in range(300)))
    whole = load_documents(TaskSpec("t", builder="text", data_files=str(big)))
    chunked = load_documents(TaskSpec("t", builder="text", data_files=str(big), chunk_chars=500))
    assert len(whole) == 1 and len(chunked) > 10 and "\n".join(chunked) == whole[0]
    poems = tmp_path / "poems.json"
    poems.write_text(json.dumps([{"id": 1, "poem": ["first line", "second line"]}, {"id": 2, "poem": []}]))
    assert load_documents(TaskSpec("t", builder="json", data_files=str(poems), text_field="poem")) == [
        "first line\nsecond line"]
    with pytest.raises(ValueError, match="chunk_chars must be positive"):
        TaskSpec("t", chunk_chars=0)


def test_new_options_at_their_default_keep_existing_zoo_hashes():
    spec = TaskSpec("t", builder="text", data_files="x.txt")
    old_style = {k: v for k, v in spec.__dict__.items() if k not in ("chunk_chars", "train_chars")}  # before both
    assert spec.hashed() == old_style and fingerprint(spec.hashed()) == fingerprint(old_style)
    assert "chunk_chars" in TaskSpec("t", chunk_chars=10).hashed()
    assert "train_chars" in TaskSpec("t", train_chars=10).hashed()


def test_a_long_tail_task_trains_on_less_text_and_keeps_its_held_out_text(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"document {i} " + "word " * 60}) for i in range(80)))
    budget = TextBudget(train_chars=10_000, val_chars=800, test_chars=800, num_demos=4, demo_chars=100)
    full = split_task(TaskSpec("t", data_files=str(path)), budget)
    tail = split_task(TaskSpec("t", data_files=str(path), train_chars=500), budget)
    assert sum(map(len, tail.train)) == 500 and sum(map(len, full.train)) == 10_000
    assert tail.train[0] == full.train[0][: len(tail.train[0])]  # the first of the same documents
    assert (tail.val, tail.test, tail.demos) == (full.val, full.test, full.demos)
    with pytest.raises(ValueError, match="train_chars must be positive"):
        TaskSpec("t", train_chars=0)
