"""The vocabulary: id layout, text form, velocity bins, labels, vocab.json."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from data_pipeline import instruments
from data_pipeline import vocab as vocab_lib
from data_pipeline.vocab import (
    END,
    PAD,
    START,
    TokenKind,
    Vocab,
    VocabConfig,
    normalize_label,
    parse_pitch,
    pitch_name,
)


def test_default_layout_sizes():
    vocab = Vocab()
    i, v, p, w = 9, 16, 128, 128
    assert vocab.size == 3 + w + i * v * p + i * p + v * 128 + 10 + 2  # + hole, fill
    assert (PAD, START, END) == (0, 1, 2)
    counts = np.bincount(vocab.kind, minlength=7)
    assert counts[TokenKind.NOTE_ON] == i * v * p
    assert counts[TokenKind.NOTE_OFF] == i * p
    assert counts[TokenKind.DRUM] == v * 128
    assert counts[TokenKind.INSTRUMENT] == 10


@pytest.mark.parametrize("config", [VocabConfig(), VocabConfig(labels=("bach", "chopin")),
                                    VocabConfig(instrument_set="gm", velocity_bins=4, pitch_min=21, pitch_max=108),
                                    VocabConfig(velocity_bins=1, max_wait=7)])
def test_every_id_has_one_text_form(config):
    vocab = Vocab(config)
    texts = [vocab.id_to_text(t) for t in range(vocab.size)]
    assert len(set(texts)) == vocab.size
    np.testing.assert_array_equal(vocab.from_text(" ".join(texts)), np.arange(vocab.size))


def test_labels_come_last_so_other_ids_do_not_move():
    plain, labelled = Vocab(), Vocab(VocabConfig(labels=("bach", "mozart")))
    assert labelled.size == plain.size + 2
    np.testing.assert_array_equal(labelled.kind[: plain.size], plain.kind)
    assert labelled.to_text([labelled.label_token("mozart")]) == "mozart"


def test_musenet_text_form_parses():
    vocab = Vocab(VocabConfig(labels=("bach",)))
    ids = vocab.from_text("bach piano violin start piano:v72:G1 violin:v80:G4 wait:12 piano:v0:G1 end")
    kinds = [TokenKind(k) for k in vocab.kind[ids]]
    assert kinds == [TokenKind.LABEL, TokenKind.INSTRUMENT, TokenKind.INSTRUMENT, TokenKind.SPECIAL,
                     TokenKind.NOTE_ON, TokenKind.NOTE_ON, TokenKind.WAIT, TokenKind.NOTE_OFF, TokenKind.SPECIAL]
    assert vocab.pitch[ids[4]] == 31 and vocab.instrument[ids[5]] == 1
    # Velocities print as their bin's centre and parse back to the same id.
    text = vocab.to_text(ids)
    np.testing.assert_array_equal(vocab.from_text(text), ids)


@pytest.mark.parametrize("bad", ["piano:v200:C4", "piano:vx:C4", "kazoo:v10:C4", "wait:0", "wait:129",
                                 "drums:v0:C2", "piano:v10:H4", "mozart", "piano:v10"])
def test_bad_text_tokens_are_rejected(bad):
    with pytest.raises(ValueError):
        Vocab().from_text(bad)


def test_velocity_bins_cover_1_to_127_and_centres_sit_in_their_bin():
    for bins in (1, 2, 7, 16, 32, 127):
        vocab = Vocab(VocabConfig(velocity_bins=bins))
        b = vocab.velocity_bin(np.arange(1, 128))
        assert b.min() == 0 and b.max() == bins - 1 and np.all(np.diff(b) >= 0)
        np.testing.assert_array_equal(vocab.velocity_bin(vocab.bin_velocity(np.arange(bins))), np.arange(bins))


def test_pitch_names():
    assert pitch_name(60) == "C4" and pitch_name(0) == "C-1" and pitch_name(127) == "G9"
    assert parse_pitch("C#4") == parse_pitch("Db4") == 61
    assert all(parse_pitch(pitch_name(p)) == p for p in range(128))
    with pytest.raises(ValueError):
        parse_pitch("G#9")


def test_labels_are_validated():
    assert normalize_label("Johann Sebastian Bach") == "johann_sebastian_bach"
    for bad in (("piano",), ("start",), ("Bach",), ("a", "a"), ("has space",)):
        with pytest.raises(ValueError):
            VocabConfig(labels=bad)


def test_vocab_json_round_trip(tmp_path):
    vocab = Vocab(VocabConfig(instrument_set="gm", velocity_bins=8, labels=("bach", "freedoom")))
    vocab.save(tmp_path / "vocab.json")
    again = Vocab.load(tmp_path / "vocab.json")
    assert again == vocab and again.size == vocab.size
    (tmp_path / "bad.json").write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="musenet-vocab-v2"):
        Vocab.load(tmp_path / "bad.json")


@pytest.mark.parametrize("text,message", [
    ("[1, 2]", "a JSON list, not an object"),
    ("42", "a JSON int, not an object"),
    ('{"format": "musenet-vocab-v1", "labels": "bach"}', "labels must be a list of strings, got 'bach'"),
    ('{"format": "musenet-vocab-v1", "labels": ["bach", 3]}', "labels must be a list of strings"),
    ('{"format": "musenet-vocab-v1", "velocity_bins": "16"}', "velocity_bins must be int, got '16'"),
    ('{"format": "musenet-vocab-v1", "max_wait": true}', "max_wait must be int, got True"),
    ('{"format": "musenet-vocab-v1", "instrument_set": null}', "instrument_set must be str, got None"),
])
def test_a_vocab_json_of_the_wrong_shape_is_a_value_error(tmp_path, text, message):
    (tmp_path / "vocab.json").write_text(text)
    with pytest.raises(ValueError, match=re.escape(message)):
        Vocab.load(tmp_path / "vocab.json")


def test_instrument_tables():
    m10 = instruments.get_instrument_set("musenet10")
    assert m10.names == ("piano", "violin", "cello", "bass", "guitar", "flute", "clarinet", "trumpet", "harp",
                         "drums")
    assert len(m10.program_class) == 128 and m10.program_class.max() < m10.drums_index
    # Spot checks of the documented GM family mapping.
    for program, name in [(0, "piano"), (24, "guitar"), (33, "bass"), (40, "violin"), (42, "cello"),
                          (46, "harp"), (56, "trumpet"), (65, "clarinet"), (73, "flute"), (110, "violin")]:
        assert m10.names[m10.program_class[program]] == name
    for cls, program in enumerate(m10.class_program[:-1]):
        assert m10.program_class[program] == cls  # the program written for a class maps back to it
    gm = instruments.get_instrument_set("gm")
    assert gm.num_classes == 129 and gm.names[0] == "acoustic_grand_piano" and gm.names[-1] == "drums"
    with pytest.raises(ValueError, match="musenet10"):
        instruments.get_instrument_set("nope")


def test_prefix_order():
    vocab = Vocab(VocabConfig(labels=("bach",)))
    assert vocab.to_text(vocab.prefix("bach", [9, 1, 0, 1])) == "bach piano violin drums start"
    assert vocab.to_text(vocab.prefix(None, [])) == "start"
    with pytest.raises(ValueError, match="unknown label"):
        vocab.prefix("mozart", [0])


def test_task_tokens_sit_before_the_labels_and_read_as_text():
    vocab = Vocab(VocabConfig(labels=("bach", "mozart")))
    assert vocab.label_base == vocab.task_base + 2 == vocab.instrument_base + vocab.instruments.num_classes + 2
    assert vocab.to_text([vocab.hole, vocab.fill]) == "hole fill"
    assert list(vocab.from_text("hole fill bach")) == [vocab.hole, vocab.fill, vocab.label_token("bach")]
    assert vocab.kind[vocab.hole] == vocab.kind[vocab.fill] == TokenKind.TASK
    assert vocab.layout()[-1] == 2
    with pytest.raises(ValueError, match="reserved"):
        VocabConfig(labels=("hole",))


def test_a_v1_vocab_json_loads_without_task_tokens_and_keeps_its_ids(tmp_path):
    """A vocab.json written before infilling (format v1, no `infill` field) gives the ids it gave then: no task
    block, labels right after the instruments, the 5-entry layout its models were saved with."""
    new = Vocab(VocabConfig(labels=("bach", "freedoom")))
    old_json = json.loads(new.to_json())
    del old_json["infill"]
    old_json["format"], old_json["size"] = "musenet-vocab-v1", new.size - 2
    (tmp_path / "vocab.json").write_text(json.dumps(old_json))
    old = Vocab.load(tmp_path / "vocab.json")
    assert not old.config.infill and old.size == new.size - 2
    assert old.label_base == old.task_base == new.task_base
    assert old.label_token("freedoom") == new.label_token("freedoom") - 2
    assert len(old.layout()) == 5 and TokenKind.TASK not in set(old.kind.tolist())
    assert len(vocab_lib.token_parts(old.layout())[0]) == old.size
    with pytest.raises(ValueError, match=r"no infilling tokens.*only continue"):
        assert old.hole
    with pytest.raises(ValueError, match="no infilling tokens"):
        old.text_to_id("fill")
    old_json["infill"] = False  # v1 files never had the field
    (tmp_path / "bad.json").write_text(json.dumps(old_json))
    with pytest.raises(ValueError, match="no infill field"):
        Vocab.load(tmp_path / "bad.json")
    # It saves as v2 with infill false and loads back the same.
    old.save(tmp_path / "again.json")
    assert Vocab.load(tmp_path / "again.json") == old
