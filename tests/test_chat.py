"""The chat format: exactly which tokens are trained on, and long histories fitted into the
context (earliest exchanges dropped whole, the system message never, then a cut inside)."""

from __future__ import annotations

import pytest

from lmforge.chat import fit_conversation, render_conversation
from lmforge.common import LmforgeError
from lmforge.tokenizer import ASSISTANT, END_TURN, SYSTEM, USER, CharTokenizer, train_bpe


@pytest.fixture(scope="module")
def tok():
    return train_bpe(["hello there, how are you? fine thanks, and you?"] * 20, vocab_size=300)


def ids_of(tok, token: str) -> int:
    return tok.tok.token_to_id(token)


def test_loss_is_on_assistant_text_and_its_end_of_turn_only(tok):
    messages = [
        {"role": "system", "content": "be kind"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "fine thanks"},
    ]
    ids, mask = render_conversation(tok, messages)
    sys_t, user, asst, end = (ids_of(tok, t) for t in (SYSTEM, USER, ASSISTANT, END_TURN))
    expected = (
        [sys_t, *tok.encode("be kind"), end]
        + [user, *tok.encode("hello"), end]
        + [asst, *tok.encode("fine thanks"), end]
    )
    assert ids == expected
    trained = [i for i, m in zip(ids, mask) if m]
    assert trained == [*tok.encode("fine thanks"), end]
    ids, mask = render_conversation(tok, messages[:2], add_generation_prompt=True)
    assert ids[-1] == asst and mask[-1] == 0 and not any(mask)


def _history(n: int) -> list[dict]:
    turns = [{"role": "system", "content": "be kind"}]
    for i in range(n):
        turns += [
            {"role": "user", "content": f"hello there {i}, how are you?"},
            {"role": "assistant", "content": f"fine thanks {i}, and you?"},
        ]
    return [*turns, {"role": "user", "content": "and now?"}]


def test_a_long_history_drops_whole_earliest_exchanges_and_keeps_the_system(tok):
    messages = _history(20)
    full = render_conversation(tok, messages, add_generation_prompt=True)[0]
    fitted = fit_conversation(tok, messages, max_tokens=len(full) // 3)
    assert len(fitted.ids) <= len(full) // 3
    assert fitted.messages[0] == messages[0] and fitted.cut_tokens == 0
    assert fitted.messages[1]["role"] == "user" and fitted.dropped_messages % 2 == 0
    assert fitted.messages == [messages[0], *messages[1 + fitted.dropped_messages :]]
    assert fitted.ids == render_conversation(tok, fitted.messages, add_generation_prompt=True)[0]
    # one exchange more would not have fitted: no more was dropped than needed
    one_more = [messages[0], *messages[fitted.dropped_messages - 1 :]]
    assert len(render_conversation(tok, one_more, add_generation_prompt=True)[0]) > len(full) // 3


def test_a_last_message_longer_than_the_budget_is_cut_inside_from_its_left(tok):
    messages = [
        {"role": "system", "content": "be kind"},
        {"role": "user", "content": "old question"},
        {"role": "assistant", "content": "old answer"},
        {"role": "user", "content": "hello there, how are you? " * 10},
    ]
    fitted = fit_conversation(tok, messages, max_tokens=30)
    assert len(fitted.ids) == 30 and fitted.dropped_messages == 2 and fitted.cut_tokens > 0
    system_part = render_conversation(tok, messages[:1])[0]
    assert fitted.ids[: len(system_part)] == system_part  # the system message is whole
    assert fitted.ids[len(system_part)] == ids_of(tok, USER)
    full_last = render_conversation(tok, messages[3:], add_generation_prompt=True)[0]
    assert fitted.ids[len(system_part) + 1 :] == full_last[1 + fitted.cut_tokens :]
    assert fitted.ids[-2:] == [ids_of(tok, END_TURN), ids_of(tok, ASSISTANT)]
    with pytest.raises(LmforgeError, match="system message"):
        fit_conversation(tok, messages, max_tokens=len(system_part) + 2)


def test_bad_conversations_are_user_errors(tok):
    with pytest.raises(LmforgeError, match="role"):
        render_conversation(tok, [{"role": "robot", "content": "x"}])
    with pytest.raises(LmforgeError, match="only come first"):
        render_conversation(
            tok, [{"role": "user", "content": "x"}, {"role": "system", "content": "y"}]
        )
    with pytest.raises(LmforgeError, match="cannot render conversations"):
        render_conversation(CharTokenizer.from_text("abc"), [{"role": "user", "content": "a"}])


def test_the_saved_chat_template_renders_as_render_conversation(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    messages = _history(2)
    ours = render_conversation(tok, messages, add_generation_prompt=True)[0]
    theirs = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    theirs = theirs["input_ids"] if isinstance(theirs, dict) or hasattr(theirs, "keys") else theirs
    assert list(theirs) == ours
