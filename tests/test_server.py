"""serve.py: the Gradio chat driven by gradio_client, the OpenAI API driven by the openai client,
bad input of every kind, and concurrent sessions without cross-talk."""

import base64
import io
import json
import threading
import urllib.request

import pytest
from helpers import random_image, tiny_config
from PIL import Image
from server_fixture import running_server

from assistant.model.builder import build_model
from assistant.weights.checkpoint import save_checkpoint


@pytest.fixture(scope="module")
def server(tiny_llm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("served-model")
    model, processor = build_model(tiny_config(tiny_llm_dir))
    save_checkpoint(model, processor, out)
    with running_server(str(out), "--concurrency", "2", "--no-compile") as url:
        yield url


def text_of(message) -> str:
    """Gradio 6 normalises chatbot content to a list of typed blocks."""
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(b.get("text", "") for b in content if b.get("type") == "text")


def is_image(message) -> bool:
    """A file block, or the image component the chat shows an image with."""
    content = message["content"]
    return not isinstance(content, str) and any(b.get("type") in ("file", "component") for b in content)


def png_bytes(image, fmt="PNG", **kw):
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def data_url(data: bytes, mime="image/png"):
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def test_gradio_client_multi_turn_with_images(server, tmp_path):
    from gradio_client import Client, handle_file

    random_image(1).save(tmp_path / "a.png")
    random_image(2).save(tmp_path / "b.png")
    client = Client(server + "/", verbose=False)
    knobs = ("", 0.0, 1.0, 8)
    chat = client.predict({"text": "What is this?", "files": [handle_file(str(tmp_path / "a.png"))]}, *knobs,
                             api_name="/chat")
    assert chat[0]["role"] == "user" and chat[-1]["role"] == "assistant"
    chat = client.predict({"text": "And now?", "files": []}, *knobs, api_name="/chat")
    chat = client.predict({"text": "Compare with this.", "files": [handle_file(str(tmp_path / "b.png"))]},
                             *knobs, api_name="/chat")
    roles = [m["role"] for m in chat]
    assert roles.count("assistant") == 3
    texts = [text_of(m) for m in chat if m["role"] == "user" and not is_image(m)]
    assert texts == ["What is this?", "And now?", "Compare with this."]
    images = [m for m in chat if m["role"] == "user" and is_image(m)]
    assert len(images) == 2  # both images stay visible in the history
    box, chat, *_ = client.predict(api_name="/undo")
    box = box.get("value", box)
    assert box["text"] == "Compare with this." and len(box["files"]) == 1 and [m["role"] for m in chat].count("assistant") == 2


def test_gradio_bad_uploads_are_readable_errors_and_chat_goes_on(server, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(server + "/", verbose=False)
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "fake.png").write_bytes(b"this is text")
    for name in ("zero.png", "fake.png"):
        with pytest.raises(Exception, match="Cannot use this image"):
            client.predict({"text": "hi", "files": [handle_file(str(tmp_path / name))]}, "", 0.0, 1.0, 4,
                           api_name="/chat")
    with pytest.raises(Exception, match="Type a question or attach an image"):
        client.predict({"text": "  ", "files": []}, "", 0.0, 1.0, 4, api_name="/chat")
    chat = client.predict({"text": "still here?", "files": []}, "", 0.0, 1.0, 4, api_name="/chat")
    assert chat[-1]["role"] == "assistant"


def test_openai_client_plain_streaming_and_two_images(server):
    from openai import OpenAI

    client = OpenAI(base_url=server + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data]
    image = data_url(png_bytes(random_image(3)))
    r = client.chat.completions.create(model="default", max_tokens=5, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                     {"type": "text", "text": "What is it?"}]}])
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens <= 5
    assert r.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.chat.completions.create(model="default", max_tokens=5, stream=True, messages=[
        {"role": "user", "content": "hello"}]))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    plain = client.chat.completions.create(model="default", max_tokens=5, messages=[
        {"role": "user", "content": "hello"}]).choices[0].message.content
    assert streamed.strip() == plain
    two = client.chat.completions.create(model="default", max_tokens=3, messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image_url", "image_url": image},  # plain-string form
                                     {"type": "image_url", "image_url": {"url": data_url(png_bytes(random_image(4)))}},
                                     {"type": "text", "text": "Same?"}]}])
    assert two.usage.prompt_tokens > 2 * 16


def test_openai_explain_returns_the_map_as_numbers_and_png(server):
    """`explain: true` (this server's extension) adds where the model looked; clients that do not send it see
    nothing new. It is passed through the openai client's extra_body, as a user would."""
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=server + "/v1", api_key="unused")
    question = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png_bytes(
        random_image(5)))}}, {"type": "text", "text": "What is it?"}]}]
    r = client.chat.completions.create(model="default", max_tokens=4, messages=question, extra_body={"explain": True})
    e = r.model_extra["explanation"]
    assert len(e["maps"]) == 1 and len(e["maps"][0]) == len(e["maps"][0][0]) >= 2
    assert abs(sum(map(sum, e["maps"][0])) - 1) < 1e-4 and isinstance(e["reliance"], float) and e["reliance_words"]
    png = base64.b64decode(e["heatmaps"][0].split(",", 1)[1])
    assert Image.open(io.BytesIO(png)).format == "PNG"
    plain = client.chat.completions.create(model="default", max_tokens=4, messages=question)
    assert "explanation" not in (plain.model_extra or {})
    chunks = list(client.chat.completions.create(model="default", max_tokens=4, messages=question, stream=True,
                                                 extra_body={"explain": True}))
    assert "maps" in chunks[-1].model_extra["explanation"]
    with pytest.raises(BadRequestError, match="needs an image"):
        client.chat.completions.create(model="default", max_tokens=4, messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"explain": True})
    with pytest.raises(BadRequestError, match="true or false"):
        client.chat.completions.create(model="default", max_tokens=4, messages=question, extra_body={"explain": "yes"})


BAD_IMAGES = {
    "zero-byte": b"",
    "not an image": b"hello world",
    "truncated": png_bytes(Image.new("RGB", (64, 64), "red"))[:60],
    "bomb": png_bytes(Image.new("1", (20000, 20000)), optimize=True),
}


@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
def test_openai_bad_images_are_400_with_a_reason(server, kind):
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=server + "/v1", api_key="unused")
    with pytest.raises(BadRequestError) as e:
        client.chat.completions.create(model="default", max_tokens=3, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(BAD_IMAGES[kind])}},
            {"type": "text", "text": "x"}]}])
    assert "messages[0].content[0]" in str(e.value)


def test_openai_request_errors(server):
    from openai import BadRequestError, NotFoundError, OpenAI

    client = OpenAI(base_url=server + "/v1", api_key="unused")
    cases = [
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}],
         "remote image URLs are not fetched"),
        ([{"role": "user", "content": ""}], "empty"),
        ([{"role": "assistant", "content": "hi"}], "last message must be from the user"),
        ([{"role": "wizard", "content": "hi"}], "role must be"),
        ([{"role": "user", "content": "x " * 5000}], "too long"),
    ]
    for messages, reason in cases:
        with pytest.raises(BadRequestError, match=reason):
            client.chat.completions.create(model="default", max_tokens=3, messages=messages)
    with pytest.raises(BadRequestError, match="temperature"):
        client.chat.completions.create(model="default", messages=[{"role": "user", "content": "x"}], temperature=9)
    with pytest.raises(NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    req = urllib.request.Request(server + "/v1/chat/completions", data=b"{nope", method="POST",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 400 and json.loads(e.value.read())["error"]["type"] == "invalid_request_error"
    # and the server still answers
    assert client.chat.completions.create(model="default", max_tokens=2, messages=[
        {"role": "user", "content": "ok?"}]).choices[0].message is not None


def test_unusual_images_are_accepted(server):
    from openai import OpenAI

    client = OpenAI(base_url=server + "/v1", api_key="unused")
    palette = Image.new("P", (20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    frames = [Image.new("RGB", (10, 10), c) for c in ("red", "blue")]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    for data in (png_bytes(Image.new("RGBA", (20, 20), (0, 0, 0, 0))), png_bytes(palette),
                 png_bytes(Image.new("CMYK", (20, 20)), "JPEG"), png_bytes(Image.new("RGB", (30, 20)), "JPEG",
                                                                           exif=exif.tobytes()),
                 gif.getvalue(), png_bytes(Image.new("I;16", (20, 20)))):
        r = client.chat.completions.create(model="default", max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(data)}}, {"type": "text", "text": "?"}]}])
        assert r.choices[0].message.role == "assistant"


def test_eight_concurrent_sessions_do_not_cross_talk(server, tmp_path):
    """Each session asks about its own image and follows up; every reply must be the one that session
    gets when it runs alone (greedy decoding is deterministic)."""
    from gradio_client import Client, handle_file

    paths = []
    for i in range(8):
        random_image(100 + i).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))

    def converse(i):
        client = Client(server + "/", verbose=False)
        chat1 = client.predict({"text": f"Question {i}?", "files": [handle_file(paths[i])]}, "", 0.0, 1.0, 6,
                                  api_name="/chat")
        chat2 = client.predict({"text": "Follow up?", "files": []}, "", 0.0, 1.0, 6, api_name="/chat")
        return text_of(chat1[-1]), text_of(chat2[-1]), chat2

    alone = [converse(i)[:2] for i in range(8)]
    assert len({a for a, _ in alone}) >= 6, "the test model must answer differently per image"
    results = [None] * 8
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, converse(i))) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        assert results[i][:2] == alone[i], f"session {i} got another session's answer"
        user_texts = [text_of(m) for m in results[i][2] if m["role"] == "user" and not is_image(m)]
        assert user_texts == [f"Question {i}?", "Follow up?"]


@pytest.mark.browser
def test_real_browser_uploads_an_image_and_sees_a_streamed_answer(server, tmp_path):
    """Headless Chromium (Debian's, driven by playwright) uses the page like a person would."""
    from pathlib import Path

    from playwright.sync_api import sync_playwright

    artifacts = Path(__file__).resolve().parents[1] / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    random_image(7, size=(64, 64)).save(tmp_path / "photo.png")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(server + "/", timeout=120_000)
            page.locator("input[type=file]").first.set_input_files(str(tmp_path / "photo.png"))
            box = page.locator("textarea").first
            box.fill("What is in this picture?")
            page.wait_for_timeout(500)
            box.press("Enter")
            bot = page.locator("[data-testid='bot']").last
            bot.wait_for(timeout=120_000)
            page.wait_for_function(
                "() => { const b = document.querySelectorAll(\"[data-testid='bot']\");"
                " return b.length && b[b.length - 1].innerText.trim().length > 0; }", timeout=120_000)
            page.wait_for_timeout(1500)
            page.screenshot(path=str(artifacts / "chat.png"), full_page=True)
            assert page.locator("[data-testid='user']").count() >= 1
            assert bot.inner_text().strip()
        finally:
            browser.close()
