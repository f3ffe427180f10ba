"""The chat's conversation model: numbered images in the prompt, the image store, and a conversation coming back
from the browser (which is not trusted)."""

import pytest
from helpers import random_image

from assistant.inputs.images import ImageError
from server.conversation import assistant_turn, chatbot_index_to_turn, to_engine, user_turn, valid_turns
from server.image_store import ImageStore
from server.reply_line import ReplyLine


@pytest.fixture
def store(tmp_path):
    return ImageStore(tmp_path / "store")


def keys_of(store, tmp_path, *seeds):
    keys = []
    for seed in seeds:
        random_image(seed).save(tmp_path / f"{seed}.png")
        keys.append(store.add(str(tmp_path / f"{seed}.png"), max_bytes=10**6))
    return keys


def test_one_image_is_not_labelled_and_several_are_numbered_in_order(store, tmp_path):
    a, b, c = keys_of(store, tmp_path, 1, 2, 3)
    messages, paths, keys = to_engine([user_turn("What is it?", [a])], store)
    assert messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "What is it?"}]
    turns = [user_turn("Compare.", [a, b]), assistant_turn("They differ."), user_turn("And this?", [c])]
    messages, paths, keys = to_engine(turns, store)
    texts = [p.get("text") for m in messages if m["role"] == "user" for p in m["content"]]
    assert texts == ["Image 1:", None, "Image 2:", None, "Compare.", "Image 3:", None, "And this?"]
    assert keys == [a, b, c] and [p.name for p in paths] == [a, b, c]


def test_the_same_image_twice_is_stored_once_and_broken_ones_are_refused(store, tmp_path):
    a1, = keys_of(store, tmp_path, 5)
    random_image(5).save(tmp_path / "copy.png")
    assert store.add(str(tmp_path / "copy.png"), max_bytes=10**6) == a1
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ImageError, match="broken.png"):
        store.add(str(tmp_path / "broken.png"), max_bytes=10**6)
    with pytest.raises(ImageError, match="upload limit"):
        store.add(str(tmp_path / "copy.png"), max_bytes=10)


def test_a_conversation_from_the_browser_cannot_name_other_files(store, tmp_path):
    a, = keys_of(store, tmp_path, 7)
    saved = [user_turn("hi", [a, "/etc/passwd", "../x.png", 3]), assistant_turn("hello"), {"role": "system"},
             "junk", {"role": "user", "text": 5}]
    turns = valid_turns(saved, store)
    assert turns == [user_turn("hi", [a]), assistant_turn("hello")]
    assert valid_turns("not a list", store) == []
    with pytest.raises(ImageError):
        store.path("0" * 40 + ".png")  # a well-formed key of an image this server does not hold


def test_chatbot_indices_map_to_turns_and_their_text(store, tmp_path):
    a, b = keys_of(store, tmp_path, 1, 2)
    turns = [user_turn("q1", [a, b]), assistant_turn("r1"), user_turn("q2", [])]
    # chatbot: [img a, img b, "q1", "r1", "q2"]
    assert [chatbot_index_to_turn(turns, i) for i in range(5)] == [(0, False), (0, False), (0, True), (1, True),
                                                                   (2, True)]
    with pytest.raises(IndexError):
        chatbot_index_to_turn(turns, 5)


def test_the_reply_line_is_first_come_first_served():
    line = ReplyLine(slots=1)
    first, second, third = line.join(), line.join(), line.join()
    assert line.wait(first, timeout=0.01)
    assert not line.wait(third, timeout=0.01) and line.ahead(third) == 2 and line.ahead(second) == 1
    line.leave(second)  # a person who stopped while waiting
    assert line.ahead(third) == 1
    line.leave(first)
    assert line.wait(third, timeout=0.01)
