"""Hub-style dataset URIs (hf://…) load through `datasets`, offline here from a local directory."""

import json

import pytest

from mergelaws import data as D


@pytest.fixture
def chat_dir(tmp_path):
    """A dataset in the Mixture-of-Thoughts layout: {messages: [...], source}."""
    d = tmp_path / "mot"
    d.mkdir()
    rows = []
    for i in range(30):
        rows.append({"messages": [{"role": "user", "content": f"Q{i}: what is {i} + {i}?"},
                                  {"role": "assistant", "content": f"{i} + {i} = {2 * i}."}],
                     "source": "algebra" if i % 3 else "geometry"})
    (d / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return d


def test_messages_format_filter_and_disjoint_holdout(chat_dir):
    uri = f"hf://{chat_dir}?split=train&format=messages&source=algebra&holdout=5"
    train = D.read_pairs(uri, part="train")
    evals = D.read_pairs(uri, part="eval")
    assert len(evals) == 5 and len(train) == 20 - 5  # 20 algebra rows in all
    assert not set(train) & set(evals)
    assert all(p.startswith("Q") and "=" in r for p, r in train + evals)
    assert D.read_pairs(uri, part="eval") == evals  # deterministic
    assert len(D.read_pairs(f"hf://{chat_dir}?format=messages&limit=7", part="train")) == 7


def test_union_of_sources_and_field_format(chat_dir, tmp_path):
    d = tmp_path / "plain"
    d.mkdir()
    (d / "data.jsonl").write_text("\n".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"})
                                            for i in range(4)) + "\n")
    uri = f"hf://{chat_dir}?format=messages&source=geometry|hf://{d}?prompt=question&response=answer"
    pairs = D.read_pairs(uri, part="train")
    assert len(pairs) == 10 + 4 and ("q3", "a3") in pairs


def test_bad_filter_column_names_the_columns(chat_dir):
    with pytest.raises(D.DataError, match="no column 'subfield' to filter on .*messages"):
        D.read_pairs(f"hf://{chat_dir}?format=messages&subfield=Algebra", part="train")


def test_a_repeated_filter_key_keeps_rows_matching_any_value(chat_dir):
    both = D.read_pairs(f"hf://{chat_dir}?format=messages&source=algebra&source=geometry", part="train")
    assert len(both) == 30
    one = D.read_pairs(f"hf://{chat_dir}?format=messages&source=geometry", part="train")
    assert len(one) == 10 and set(one) < set(both)


def test_a_filter_matching_nothing_lists_the_values_the_column_holds(chat_dir):
    with pytest.raises(D.DataError) as e:
        D.read_pairs(f"hf://{chat_dir}?format=messages&source=Algebra", part="train")
    msg = str(e.value)
    assert "no row has source = 'Algebra'" in msg
    assert "'algebra' (20), 'geometry' (10)" in msg and "fix 'source='" in msg


def test_openr1_math_layout_with_problem_types_mapped_to_a_subfield(tmp_path):
    """The layout config/paper.yaml reads from open-r1/OpenR1-Math-220k (problem_type + messages),
    with a value holding spaces written with '+' as in the config's URIs."""
    d = tmp_path / "openr1"
    d.mkdir()
    types = ["Algebra", "Combinatorics", "Logic and Puzzles", "Geometry", "Other"]
    rows = [{"problem": f"P{i}", "problem_type": types[i % 5], "uuid": str(i),
             "messages": [{"role": "user", "content": f"P{i}"}, {"role": "assistant", "content": f"S{i}"}]}
            for i in range(50)]
    (d / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    uri = f"hf://{d}?split=train&format=messages&problem_type=Combinatorics&problem_type=Logic+and+Puzzles&holdout=4"
    train, evals = D.read_pairs(uri, part="train"), D.read_pairs(uri, part="eval")
    assert len(train) == 16 and len(evals) == 4 and not set(train) & set(evals)
    assert {int(p[1:]) % 5 for p, _ in train + evals} == {1, 2}
