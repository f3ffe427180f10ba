"""The chat page in headless Chromium (Debian's, driven by playwright), used as a person would: every expected
problem is a warning that leaves the page usable, the controls follow the reply, edits, images, the trash icon, a
reload, paste and drop, and a second tab waiting its turn. Screenshots of each step go to test-artifacts/."""

from pathlib import Path

import pytest
from helpers import random_image, tiny_config
from server_fixture import running_server

from assistant.model.builder import build_model
from assistant.weights.checkpoint import save_checkpoint

pytestmark = pytest.mark.browser
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def server(tiny_llm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("chat-model")
    model, processor = build_model(tiny_config(tiny_llm_dir))
    save_checkpoint(model, processor, out)
    with running_server(str(out), "--no-compile") as url:  # one reply at a time: a second tab waits in line
        yield url


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    random_image(1, size=(64, 64)).save(folder / "first.png")
    random_image(2, size=(64, 48)).save(folder / "second.png")
    random_image(3, size=(32, 32)).save(folder / "third.png")
    (folder / "broken.png").write_bytes(b"this is not an image")
    return folder


class ChatPage:
    def __init__(self, page, url):
        self.page = page
        page.goto(url, timeout=120_000)
        page.locator("textarea").first.wait_for(timeout=60_000)
        page.wait_for_timeout(1000)

    @property
    def box(self):
        return self.page.locator("textarea").first

    def shot(self, name: str) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"chat-{name}.png"))

    def attach(self, *paths) -> None:
        self.page.locator("input[type=file]").first.set_input_files([str(p) for p in paths])
        self.page.wait_for_timeout(800)

    def send(self, text: str) -> None:
        self.box.fill(text)
        self.box.press("Enter")

    def streaming(self) -> bool:
        return self.page.locator(".stop-button").count() > 0

    def wait_reply(self, timeout=60_000) -> None:
        self.page.wait_for_timeout(300)
        self.page.wait_for_function("() => !document.querySelector('.stop-button')", timeout=timeout)
        self.page.wait_for_timeout(500)

    def users(self) -> list[str]:
        return [m.inner_text().strip() for m in self.page.locator("[data-testid='user']").all()]

    def bots(self) -> list[str]:
        return [m.inner_text().strip() for m in self.page.locator("[data-testid='bot']").all()]

    def warnings(self) -> str:
        return " ".join(self.page.locator(".toast-body").all_inner_texts())

    def button(self, name: str):
        return self.page.get_by_role("button", name=name, exact=True)

    def set_max_tokens(self, n: int) -> None:
        field = self.page.get_by_label("number input for Max new tokens")
        if not field.is_visible():
            self.page.get_by_text("Settings", exact=True).first.click()
        field.fill(str(n))
        field.press("Enter")
        self.page.wait_for_timeout(300)

    def assert_usable(self) -> None:
        """No error overlay anywhere, and the box takes text."""
        overlays = self.page.locator(".error").filter(has_text="Error")
        assert overlays.count() == 0 or not any(o.is_visible() for o in overlays.all())
        assert self.box.is_enabled() and self.box.is_editable()


def test_chat_page_never_blocks_and_keeps_the_conversation(server, browser, images):
    chat = ChatPage(browser.new_page(viewport={"width": 1100, "height": 1000}), server)
    page = chat.page
    assert "Vision Assistant" in page.content()
    assert page.get_by_text("About this model").count() == 1  # the details are folded away
    chat.shot("01-start")

    # An empty send and a broken upload: a warning each, nothing covered, what was typed stays.
    chat.send("")
    page.wait_for_timeout(1000)
    assert "Type a question or attach an image" in chat.warnings()
    chat.assert_usable()
    chat.shot("02-empty-send")
    chat.attach(images / "broken.png")
    chat.send("What is this?")
    page.wait_for_timeout(1500)
    assert "Cannot use this image" in chat.warnings()
    assert chat.box.input_value() == "What is this?"
    chat.assert_usable()
    chat.shot("03-broken-upload")
    page.locator("button[aria-label*='Remove'], button[aria-label*='remove'], .thumbnail-item button").first.click()
    page.wait_for_timeout(300)

    # Nothing to retry yet: a warning, not an overlay.
    chat.button("Retry").click()
    page.wait_for_timeout(1000)
    assert "Nothing to retry yet" in chat.warnings()
    chat.assert_usable()

    # A reply streams: Send is Stop, and Retry, Undo and New chat wait for it.
    chat.set_max_tokens(700)
    chat.box.fill("")
    chat.attach(images / "first.png")
    chat.send("What is in the first picture?")
    page.wait_for_function("() => document.querySelector('.stop-button')", timeout=30_000)
    assert all(chat.button(name).is_disabled() for name in ("Retry", "Undo", "New chat"))
    chat.shot("04-streaming")
    chat.wait_reply()
    assert all(chat.button(name).is_enabled() for name in ("Retry", "Undo", "New chat"))
    assert chat.users() == ["Image 1", "What is in the first picture?"] and len(chat.bots()) == 1

    # Stop: the reply ends where it was, no overlay, the controls come back.
    chat.send("Tell me a long story.")
    page.wait_for_function("() => document.querySelector('.stop-button')", timeout=30_000)
    page.wait_for_timeout(300)
    page.locator(".stop-button").first.click()
    chat.wait_reply()
    chat.assert_usable()
    assert chat.button("Retry").is_enabled()
    chat.shot("05-stopped")

    # A second image: numbered in the chat.
    chat.set_max_tokens(16)
    chat.attach(images / "second.png")
    chat.send("And the second image?")
    chat.wait_reply()
    assert "Image 2" in chat.users()
    chat.shot("06-two-images")

    # Editing the first question (it carries an image): the turns after it go, and it is answered again.
    first = page.locator("[data-testid='user']").nth(1)
    first.hover()
    page.locator("button[aria-label='Edit']").first.click()
    editor = page.locator("textarea").first  # the message's editor comes before the box
    editor.fill("What colour is it?")
    page.locator("[class*=message-buttons] button[aria-label='Submit']").first.click()
    page.wait_for_timeout(500)
    chat.wait_reply()
    assert chat.users() == ["Image 1", "What colour is it?"] and len(chat.bots()) == 1
    chat.shot("07-edited-image-question")

    # Where did it look: offered under each answer (the flag); the panel shows the image with its map, in words too.
    page.locator("[data-testid='bot']").last.hover()
    page.locator("button[aria-label='Feedback']").last.click()
    page.locator("button", has_text="Where did it look?").first.click()
    page.get_by_text("on the image.").first.wait_for(timeout=120_000)  # "... depended strongly / hardly on the image."
    assert page.locator("#where-gallery img").count() >= 1
    page.locator("#where-gallery").scroll_into_view_if_needed()
    gallery, first = page.locator("#where-gallery").bounding_box(), page.locator("#where-gallery img").first.bounding_box()
    assert first["width"] < gallery["width"] / 2, (first, gallery)  # a thumbnail, not one image over the whole row
    chat.shot("12-where-it-looked")

    # A reload brings the conversation back, images included.
    page.reload()
    page.locator("[data-testid='user']").first.wait_for(timeout=30_000)
    page.wait_for_timeout(1000)
    assert chat.users() == ["Image 1", "What colour is it?"] and len(chat.bots()) == 1
    assert page.locator("[data-testid='user'] img").count() == 1
    chat.shot("08-after-reload")

    # Undo: the last question goes back to the box, its image with it.
    chat.button("Undo").click()
    page.wait_for_timeout(800)
    assert chat.users() == [] and chat.box.input_value() == "What colour is it?"
    assert page.locator(".thumbnail-item, .thumbnail-small").count() >= 1
    chat.shot("08b-undo")
    chat.box.press("Enter")
    chat.wait_reply()
    assert chat.users() == ["Image 1", "What colour is it?"]

    # The chat's trash icon starts over on both sides: the next message does not bring the old one back.
    page.locator("button[aria-label='Clear']").first.click()
    page.wait_for_timeout(800)
    assert chat.users() == []
    chat.send("Hello there")
    chat.wait_reply()
    assert chat.users() == ["Hello there"] and len(chat.bots()) == 1
    chat.shot("09-after-trash")
    page.reload()
    page.locator("[data-testid='user']").first.wait_for(timeout=30_000)
    assert chat.users() == ["Hello there"]

    # New chat does the same.
    chat.button("New chat").click()
    page.wait_for_timeout(800)
    assert chat.users() == [] and chat.bots() == []
    page.close()


def test_paste_and_drop_attach_images(server, browser, images):
    chat = ChatPage(browser.new_page(viewport={"width": 1100, "height": 900}), server)
    page = chat.page
    data = list((images / "third.png").read_bytes())
    event = """([kind, bytes]) => {
        const file = new File([new Uint8Array(bytes)], kind + '.png', {type: 'image/png'});
        const dt = new DataTransfer(); dt.items.add(file);
        const box = document.querySelector('textarea');
        if (kind === 'pasted') {
            box.dispatchEvent(new ClipboardEvent('paste', {clipboardData: dt, bubbles: true, cancelable: true}));
        } else {
            const zone = box.closest('.full-container') || box.parentElement;
            for (const type of ['dragenter', 'dragover', 'drop'])
                zone.dispatchEvent(new DragEvent(type, {dataTransfer: dt, bubbles: true, cancelable: true}));
        }
    }"""
    page.evaluate(event, ["pasted", data])
    page.wait_for_timeout(1500)
    page.evaluate(event, ["dropped", data])
    page.wait_for_timeout(1500)
    chat.shot("10-paste-and-drop")
    chat.send("Two of the same?")
    chat.wait_reply()
    assert chat.users() == ["Image 1", "Image 2", "Two of the same?"]
    page.close()


def test_a_second_tab_sees_its_place_in_line(server, browser, images):
    first = ChatPage(browser.new_context().new_page(), server)
    second = ChatPage(browser.new_context(viewport={"width": 1100, "height": 800}).new_page(), server)
    first.set_max_tokens(700)
    first.send("Write a very long story.")
    first.page.wait_for_function("() => document.querySelector('.stop-button')", timeout=30_000)
    second.send("Is it my turn?")
    second.page.get_by_text("1 reply ahead of yours").wait_for(timeout=10_000)
    assert second.users() == ["Is it my turn?"]  # the waiting question is shown at once
    second.shot("11-waiting-in-line")
    first.page.locator(".stop-button").first.click()
    second.wait_reply()
    assert len(second.bots()) == 1 and "ahead of yours" not in second.bots()[0]
    first.page.context.close()
    second.page.context.close()
