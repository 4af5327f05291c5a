"""Take docs/explorer.png: the attention explorer's page in headless Chromium (docs/explorer.md).

    python scripts/explorer_screenshot.py --checkpoint runs/demo/model --out docs/explorer.png

Serves the checkpoint with `pixel_bert.explore` on a free loopback port, picks a built-in scene
and sentence, sets the layer, hovers a word, clicks the feature cell that word attends to most
(the reverse direction shows beside it) and saves a screenshot. Needs selenium and Chromium with
its driver (Debian: apt-get install chromium chromium-driver; selenium is in the "test" extra).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pixel_bert.explore import Explorer, make_server  # noqa: E402
from pixel_bert.inference import PixelBertPredictor  # noqa: E402


def chromium(width: int, height: int):
    """Headless Chromium with the flags a closed network needs (it stalls on connections otherwise)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={tempfile.mkdtemp()}",
                 f"--window-size={width},{height}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"),
                            options=options)


def wait_ready(driver, done_before: int, timeout: float = 60.0) -> None:
    from selenium.webdriver.common.by import By
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = driver.find_element(By.ID, "status")
        if int(status.get_attribute("data-done") or 0) > done_before and status.get_attribute("data-state") == "ready":
            return
        time.sleep(0.05)
    raise SystemExit(f"the page did not get ready: {driver.find_element(By.ID, 'status').text}")


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a model folder (RUN/model) or model.pt")
    p.add_argument("--scene", type=int, default=0, help="built-in scene, 0-3 (default 0)")
    p.add_argument("--text", default=None, help="sentence (default: the scene's first suggestion)")
    p.add_argument("--word", default=None, help="word to hover (default: the sentence's first colour word)")
    p.add_argument("--layer", type=int, default=0, help="layer to show (default 0)")
    p.add_argument("--size", default="1200x820", help="window WIDTHxHEIGHT in pixels (default 1200x820)")
    p.add_argument("--out", default="docs/explorer.png", help="output PNG (default docs/explorer.png)")
    args = p.parse_args(argv)
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    predictor = PixelBertPredictor.from_checkpoint(args.checkpoint)
    explorer = Explorer(predictor)
    text = args.text or explorer.scenes[args.scene].suggestions[0]
    inspection = predictor.inspect(explorer.scenes[args.scene].image, text)
    colours = ("red", "green", "blue", "yellow", "purple", "white")
    word = args.word or next((t for t in inspection.tokens if t in colours), inspection.tokens[1])
    maps = inspection.maps(args.layer)
    peak = int(maps.map_for(word).flatten().argmax())
    server = make_server(explorer, "127.0.0.1", 0, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    width, height = (int(v) for v in args.size.split("x"))
    driver = chromium(width, height)
    try:
        # the viewport itself at the asked size (the window's size would include the browser's frame)
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               dict(width=width, height=height, deviceScaleFactor=1, mobile=False))
        driver.get(server.url)
        wait_ready(driver, 0)
        driver.find_elements(By.CSS_SELECTOR, "#scenes button")[args.scene].click()
        before = int(driver.find_element(By.ID, "status").get_attribute("data-done"))
        sentence = driver.find_element(By.ID, "sentence")
        sentence.clear()
        sentence.send_keys(text, Keys.ENTER)
        wait_ready(driver, before)
        driver.find_element(By.ID, "layer").send_keys(*[Keys.ARROW_RIGHT] * args.layer)
        grid = driver.find_element(By.ID, "grid-canvas")
        gw, stride = maps.grid[1], maps.stride
        scale = grid.size["width"] / maps.image_size[0]
        row, col = divmod(peak, gw)
        ActionChains(driver).move_to_element_with_offset(
            grid, round((col + 0.5) * stride * scale - grid.size["width"] / 2),
            round((row + 0.5) * stride * scale - grid.size["height"] / 2)).click().perform()
        chip = next(c for c in driver.find_elements(By.CSS_SELECTOR, ".token")
                    if c.find_element(By.CSS_SELECTOR, ".word").text == word)
        ActionChains(driver).move_to_element(chip).perform()
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        driver.save_screenshot(args.out)
    finally:
        driver.quit()
        server.shutdown()
    print(f"wrote {args.out}: scene {args.scene}, {text!r}, word {word!r}, layer {args.layer}, cell {divmod(peak, gw)}")
    return args.out


if __name__ == "__main__":
    main()
