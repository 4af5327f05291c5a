// The attention explorer's page (pixel_bert/explore.py): plain JavaScript, no library, no build step.
//
// One request per (image, sentence) returns every layer's and head's attention in both directions
// (float16, base64); words, layers, heads and cells are then explored here without the server.
// The written HTML file (--html) carries the same script with one result inline and no server.
"use strict";
(function () {
  // The ramp of pixel_bert/visualize.py (HEAT_ANCHORS): brightness rises with the value.
  const HEAT_ANCHORS = [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66],
    [245, 125, 21], [250, 193, 39], [252, 255, 164]];
  const DISPLAY_SIDE = 384;  // longer side of the drawn image, in CSS pixels
  const SPECIAL = new Set(["[CLS]", "[SEP]", "[PAD]"]);
  const $ = (id) => document.getElementById(id);

  const state = {
    info: null,        // the model and the demo scenes (GET api/info, or inline)
    image: null,       // {kind: "scene", index} or {kind: "upload", name, data}
    result: null,      // the decoded payload of the last answer
    word: null,        // index of the token whose map is drawn
    cell: null,        // index of the clicked feature cell, or null
    sent: 0,           // requests sent; an answer to an older one is dropped
    done: 0,           // requests answered (exposed on #status for tests)
    staticPage: false, // the --html file: no server behind it
  };

  // ---- float16 -----------------------------------------------------------------------------------

  // Every float16 bit pattern's value, once: decoding is then one table look-up per number.
  const HALF = (function () {
    const table = new Float32Array(65536);
    for (let h = 0; h < 65536; h++) {
      const sign = h & 0x8000 ? -1 : 1, exponent = (h >> 10) & 0x1f, fraction = h & 0x3ff;
      let value;
      if (exponent === 0) value = fraction * Math.pow(2, -24);                 // subnormal
      else if (exponent === 31) value = fraction ? NaN : Infinity;
      else value = (1 + fraction / 1024) * Math.pow(2, exponent - 15);
      table[h] = sign * value;
    }
    return table;
  })();

  // {shape, dtype: "float16", data: base64 little-endian} -> Float32Array, checked against its shape
  function decodeHalf(encoded) {
    const bytes = atob(encoded.data);
    const n = bytes.length >> 1;
    const expected = encoded.shape.reduce((a, b) => a * b, 1);
    if (encoded.dtype !== "float16" || n !== expected) {
      throw new Error(`attention array of ${n} numbers for shape ${encoded.shape}`);
    }
    const out = new Float32Array(n);
    for (let i = 0; i < n; i++) out[i] = HALF[bytes.charCodeAt(2 * i) | (bytes.charCodeAt(2 * i + 1) << 8)];
    return out;
  }

  // ---- attention cut out of the payload ----------------------------------------------------------

  function headsOf(r) {
    const h = $("head").value;
    return h === "mean" ? Array.from({length: r.heads}, (_, i) => i) : [Number(h)];
  }

  function layerOf() { return Number($("layer").value); }

  // Raw attention of token t over the K cells (heads averaged when "mean of heads"), padded cells 0.
  function textToPixels(r, layer, heads, t) {
    const out = new Float32Array(r.K);
    for (const h of heads) {
      const base = ((layer * r.heads + h) * r.T + t) * r.K;
      for (let k = 0; k < r.K; k++) out[k] += r.t2p[base + k] / heads.length;
    }
    return out;
  }

  // Raw attention of cell k over the T text tokens (pixel-to-text).
  function pixelToText(r, layer, heads, k) {
    const out = new Float32Array(r.T);
    for (const h of heads) {
      const base = ((layer * r.heads + h) * r.K + k) * r.T;
      for (let t = 0; t < r.T; t++) out[t] += r.p2t[base + t] / heads.length;
    }
    return out;
  }

  const sum = (values) => values.reduce((a, b) => a + b, 0);

  // ---- drawing -----------------------------------------------------------------------------------

  function heatColour(v) {
    const x = Math.min(1, Math.max(0, v)) * (HEAT_ANCHORS.length - 1);
    const i = Math.min(HEAT_ANCHORS.length - 2, Math.floor(x)), f = x - i;
    return HEAT_ANCHORS[i].map((c, ch) => c + f * (HEAT_ANCHORS[i + 1][ch] - c));
  }

  // The ramp at 1024 steps (finer than 8-bit colour), so a map is drawn without a call per pixel.
  const RAMP_STEPS = 1024;
  const RAMP = (function () {
    const ramp = new Uint8ClampedArray(4 * RAMP_STEPS);
    for (let i = 0; i < RAMP_STEPS; i++) {
      const a = i / (RAMP_STEPS - 1), rgb = heatColour(a);
      ramp.set([Math.round(rgb[0]), Math.round(rgb[1]), Math.round(rgb[2]), Math.round(255 * (0.2 + 0.7 * a))], 4 * i);
    }
    return ramp;
  })();

  // Bilinear weights along one axis, as torch's interpolate(align_corners=False) on the grid's
  // extent: display pixel p samples grid coordinate (p + 0.5) * (image side / display side) / stride - 0.5.
  function axisWeights(displaySide, imageSide, stride, cells) {
    const weights = [];
    for (let p = 0; p < displaySide; p++) {
      let u = ((p + 0.5) * imageSide / displaySide) / stride - 0.5;
      u = Math.min(cells - 1, Math.max(0, u));
      const lo = Math.floor(u), hi = Math.min(cells - 1, lo + 1);
      weights.push([lo, hi, u - lo]);
    }
    return weights;
  }

  // The map (K cells, renormalised) as a heat layer over the image: scaled to its own maximum,
  // opacity rising with the value (as visualize.overlay), drawn on the grid's true extent and cut
  // to the image, so cells that reach past the image into padding are never stretched over it.
  function drawHeat(map) {
    const r = state.result, canvas = $("heat-canvas"), ctx = canvas.getContext("2d");
    const [gh, gw] = r.grid, W = canvas.width, H = canvas.height;
    const max = Math.max(...map) || 1;
    const image = ctx.createImageData(W, H);
    for (let y = 0; y < H; y++) {
      const [r0, r1, fy] = r.rowWeights[y];
      for (let x = 0; x < W; x++) {
        const [c0, c1, fx] = r.colWeights[x];
        const top = map[r0 * gw + c0] * (1 - fx) + map[r0 * gw + c1] * fx;
        const bottom = map[r1 * gw + c0] * (1 - fx) + map[r1 * gw + c1] * fx;
        const a = Math.min(1, Math.max(0, (top * (1 - fy) + bottom * fy) / max));
        const from = 4 * Math.round(a * (RAMP_STEPS - 1)), at = 4 * (y * W + x);
        for (let c = 0; c < 4; c++) image.data[at + c] = RAMP[from + c];
      }
    }
    ctx.putImageData(image, 0, 0);
    $("image-canvas").classList.add("dimmed");
  }

  // Cell borders (cells inside the image only) and the clicked cell.
  function drawGrid() {
    const r = state.result, canvas = $("grid-canvas"), ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    const cellW = r.stride * r.scale, [gh, gw] = r.grid;
    if ($("show-grid").checked) {
      ctx.strokeStyle = "rgba(255, 255, 255, 0.35)";
      ctx.lineWidth = 1;
      ctx.beginPath();
      for (let c = 1; c < gw; c++) { const x = Math.round(c * cellW) + 0.5; ctx.moveTo(x, 0); ctx.lineTo(x, canvas.height); }
      for (let g = 1; g < gh; g++) { const y = Math.round(g * cellW) + 0.5; ctx.moveTo(0, y); ctx.lineTo(canvas.width, y); }
      ctx.stroke();
    }
    if (state.cell !== null) {
      const row = Math.floor(state.cell / gw), col = state.cell % gw;
      ctx.strokeStyle = "#35d0ff";
      ctx.lineWidth = 3;
      ctx.strokeRect(col * cellW + 1.5, row * cellW + 1.5, cellW - 3, cellW - 3);
    }
  }

  function drawLegend() {
    const canvas = $("legend-canvas"), ctx = canvas.getContext("2d");
    for (let x = 0; x < canvas.width; x++) {
      const [red, green, blue] = heatColour(x / (canvas.width - 1));
      ctx.fillStyle = `rgb(${Math.round(red)}, ${Math.round(green)}, ${Math.round(blue)})`;
      ctx.fillRect(x, 0, 1, canvas.height);
    }
  }

  function element(tag, props, children) {
    const node = document.createElement(tag);
    Object.assign(node, props || {});
    for (const child of children || []) node.append(child);
    return node;
  }

  function percent(v, digits) { return `${(100 * v).toFixed(digits === undefined ? 0 : digits)}%`; }

  // ---- the view ----------------------------------------------------------------------------------

  function redraw() {
    const r = state.result;
    if (!r) return;
    const layer = layerOf(), heads = headsOf(r);
    $("layer-value").textContent = String(layer);
    const headName = heads.length > 1 ? "mean of heads" : `head ${heads[0]}`;
    // each word's share of attention on pixels, for this layer and head
    for (const chip of $("tokens").children) {
      const t = Number(chip.dataset.index), mass = sum(textToPixels(r, layer, heads, t));
      chip.dataset.mass = mass.toFixed(6);
      chip.querySelector(".mass span").style.width = percent(Math.min(1, mass), 1);
      chip.querySelector(".pct").textContent = `${percent(mass)} on pixels`;
      chip.classList.toggle("active", t === state.word);
    }
    if (state.word !== null) {
      const raw = textToPixels(r, layer, heads, state.word), mass = sum(raw);
      const map = raw.map((v) => (mass > 0 ? v / mass : 0));
      drawHeat(map);
      const validCells = r.valid.filter(Boolean).length, peak = Math.max(...map) * validCells;
      const caption = `\u201c${r.tokens[state.word]}\u201d, layer ${layer}, ${headName}: ` +
        (mass > 0 ? `peak ${peak.toFixed(1)}x uniform, ${percent(mass)} of its attention on pixels`
          : "no attention on pixels at all");
      $("map-caption").textContent = caption;
      $("heat-canvas").setAttribute("aria-label", caption);
    }
    drawGrid();
    drawCellPanel(layer, heads, headName);
  }

  // Rows of {index, label, value} as labelled bars: probabilities (absolute) fill the bar at 1,
  // attention shares (relative) at the list's largest value, so small shares stay readable.
  function barList(list, rows, absolute) {
    list.replaceChildren();
    const top = absolute ? 1 : Math.max(...rows.map((row) => row.value)) || 1;
    for (const row of rows) {
      const bar = element("span", {className: "bar"}, [element("span")]);
      bar.firstChild.style.width = percent(row.value / top, 1);
      const item = element("li", {}, [element("span", {textContent: row.label}), bar,
        element("span", {className: "num", textContent: percent(row.value, 1)})]);
      item.dataset.token = String(row.index);
      item.dataset.value = row.value.toFixed(6);
      list.append(item);
    }
  }

  // The reverse direction for the clicked cell: which words look at it, and where it looks.
  function drawCellPanel(layer, heads, headName) {
    const r = state.result;
    $("cell-panel").hidden = state.cell === null;
    $("cell-hint").hidden = state.cell !== null;
    if (state.cell === null) return;
    const k = state.cell, [, gw] = r.grid, row = Math.floor(k / gw), col = k % gw;
    const x0 = col * r.stride, y0 = row * r.stride;
    $("cell-title").textContent = `Feature cell (row ${row}, column ${col}): pixels ${x0}-${x0 + r.stride - 1} across, ` +
      `${y0}-${y0 + r.stride - 1} down; layer ${layer}, ${headName}`;
    const fromWords = [];
    for (let t = 0; t < r.T; t++) {
      const raw = textToPixels(r, layer, heads, t), mass = sum(raw);
      fromWords.push({index: t, label: r.tokens[t], value: mass > 0 ? raw[k] / mass : 0});
    }
    fromWords.sort((a, b) => b.value - a.value);
    barList($("cell-from-words"), fromWords);
    const toText = pixelToText(r, layer, heads, k);
    const toWords = Array.from(toText, (v, t) => ({index: t, label: r.tokens[t], value: v}));
    toWords.sort((a, b) => b.value - a.value);
    $("cell-to-note").textContent = `${percent(sum(toText), 1)} of this cell's attention goes to the words ` +
      "(the rest to feature pixels)";
    barList($("cell-to-words"), toWords);
  }

  function selectWord(t) {
    if (state.word === t) return;
    state.word = t;
    redraw();
  }

  function buildTokens(previousWord) {
    const r = state.result, box = $("tokens");
    box.replaceChildren();
    r.tokens.forEach((token, t) => {
      const chip = element("button", {type: "button", className: "token" + (SPECIAL.has(token) ? " special" : "")},
        [element("span", {className: "word", textContent: token}),
          element("span", {className: "mass"}, [element("span")]), element("span", {className: "pct"})]);
      chip.dataset.index = String(t);
      chip.addEventListener("mouseenter", () => selectWord(t));
      chip.addEventListener("focus", () => selectWord(t));
      chip.addEventListener("click", () => selectWord(t));
      box.append(chip);
    });
    // keep the word looked at before when the new sentence has it, else the first real word
    let word = r.tokens.indexOf(previousWord);
    if (word < 0) word = r.tokens.findIndex((token) => !SPECIAL.has(token));
    state.word = word < 0 ? 0 : word;
  }

  function buildOutputs() {
    const r = state.result, box = $("outputs");
    box.replaceChildren();
    if (r.itm !== null && r.itm !== undefined) {
      box.append(element("h2", {textContent: "Image-text matching (ITM)"}),
        element("p", {}, [element("span", {className: "score", id: "itm-score", textContent: r.itm.toFixed(3)}),
          element("span", {className: "subtle", textContent:
            " probability that the sentence describes the image (eq. (8): sigmoid of the ITM logit)"})]));
    }
    for (const fill of r.fill_mask || []) {
      const list = element("ol", {className: "bars fill-mask"});
      barList(list, fill.top.map(([word, p], i) => ({index: i, label: word, value: p})), true);
      box.append(element("h2", {textContent: `[MASK] at position ${fill.position}: top fill-ins`}), list);
    }
    if (r.answers) {
      const list = element("ol", {className: "bars answers", id: "answers"});
      barList(list, r.answers.map(([answer, p], i) => ({index: i, label: answer, value: p})), true);
      box.append(element("h2", {textContent: "VQA: top answers"}),
        element("p", {className: "subtle", textContent: "independent sigmoid scores (VQA is trained with binary cross-entropy)"}),
        list);
    }
  }

  // A payload from the server or the file -> the page, with its image drawn before "ready".
  function showResult(payload) {
    const r = Object.assign({}, payload);
    r.T = r.tokens.length;
    r.K = r.grid[0] * r.grid[1];
    r.t2p = decodeHalf(r.text_to_pixels);
    r.p2t = decodeHalf(r.pixels_to_text);
    const [iw, ih] = r.image_size;
    r.scale = DISPLAY_SIDE / Math.max(iw, ih);
    r.width = Math.max(1, Math.round(iw * r.scale));
    r.height = Math.max(1, Math.round(ih * r.scale));
    r.colWeights = axisWeights(r.width, iw, r.stride, r.grid[1]);
    r.rowWeights = axisWeights(r.height, ih, r.stride, r.grid[0]);
    const previousWord = state.result && state.word !== null ? state.result.tokens[state.word] : null;
    state.result = r;
    state.cell = null;
    for (const id of ["image-canvas", "heat-canvas", "grid-canvas"]) {
      const canvas = $(id);
      canvas.width = r.width; canvas.height = r.height;
      canvas.style.width = `${r.width}px`; canvas.style.height = `${r.height}px`;
    }
    const slider = $("layer");
    slider.max = String(r.layers - 1);
    if (layerOf() > r.layers - 1) slider.value = String(r.layers - 1);
    const head = $("head"), chosen = head.value;
    head.replaceChildren(element("option", {value: "mean", textContent: "mean of heads"}));
    for (let h = 0; h < r.heads; h++) head.append(element("option", {value: String(h), textContent: `head ${h}`}));
    head.value = chosen === "mean" || Number(chosen) < r.heads ? chosen : "mean";
    $("notices").replaceChildren(...r.notices.map((n) => element("li", {textContent: n})));
    buildTokens(previousWord);
    buildOutputs();
    $("result").hidden = false;
    return new Promise((resolve) => {
      const picture = new Image();
      picture.onload = () => {
        const ctx = $("image-canvas").getContext("2d");
        ctx.imageSmoothingEnabled = r.scale < 1;  // small images are shown as their pixels
        ctx.drawImage(picture, 0, 0, r.width, r.height);
        redraw();
        resolve();
      };
      picture.onerror = () => { redraw(); resolve(); };
      picture.src = r.image;
    });
  }

  // ---- talking to the server ---------------------------------------------------------------------

  function setStatus(kind, text) {
    const status = $("status");
    status.dataset.state = kind;
    status.dataset.done = String(state.done);
    status.textContent = text;
  }

  function showMessage(text) {
    $("message").textContent = text || "";
    $("message").hidden = !text;
  }

  async function run() {
    if (state.staticPage) return;
    if (!state.image) { showMessage("pick a scene or upload an image first"); return; }
    const body = {text: $("sentence").value};
    if (state.image.kind === "scene") body.scene = state.image.index;
    else { body.image = state.image.data; body.filename = state.image.name; }
    const request = ++state.sent;
    setStatus("busy", "running the model (one forward pass)...");
    let answer, error = null;
    try {
      const response = await fetch("api/analyse", {method: "POST", headers: {"Content-Type": "application/json"},
        body: JSON.stringify(body)});
      try { answer = await response.json(); } catch (e) { answer = null; }
      if (!response.ok || !answer) {
        error = (answer && answer.error) || `the server answered HTTP ${response.status} with no message`;
      }
    } catch (e) {
      const mb = (state.info.max_request_bytes / 1024 / 1024).toFixed(1);
      error = `no answer from the server (${e.message}). Is python -m pixel_bert.explore still running? ` +
        `It refuses requests over ${mb} MB.`;
    }
    if (request !== state.sent) return;  // a newer request is on its way: its answer is the one to show
    state.done++;
    if (error) { showMessage(error); setStatus("error", "nothing drawn for this input"); return; }
    showMessage("");
    await showResult(answer);
    setStatus("ready", `${answer.source}: one forward pass in ${answer.seconds.toFixed(2)} s; ` +
      "words, layers and heads are drawn here without asking the model again");
  }

  function chooseScene(index) {
    state.image = {kind: "scene", index};
    $("upload").value = "";
    const scene = state.info.scenes[index];
    for (const button of $("scenes").children) {
      button.setAttribute("aria-checked", String(Number(button.dataset.index) === index));
    }
    const sentence = $("sentence"), known = state.info.scenes.flatMap((s) => s.suggestions);
    if (!sentence.value.trim() || known.includes(sentence.value)) sentence.value = scene.suggestions[0];
    showSuggestions(scene.suggestions);
    run();
  }

  function showSuggestions(sentences) {
    $("suggestions").replaceChildren(...sentences.map((text) => {
      const button = element("button", {type: "button", textContent: text});
      button.addEventListener("click", () => { $("sentence").value = text; run(); });
      return button;
    }));
  }

  function chooseUpload(file) {
    if (!file) return;
    for (const button of $("scenes").children) button.setAttribute("aria-checked", "false");
    showSuggestions([]);
    const reader = new FileReader();
    reader.onload = () => {
      const url = String(reader.result), comma = url.indexOf(",");
      state.image = {kind: "upload", name: file.name, data: comma >= 0 ? url.slice(comma + 1) : ""};
      if ($("sentence").value.trim()) run();
    };
    reader.onerror = () => showMessage(`${file.name}: the browser could not read the file`);
    reader.readAsDataURL(file);
  }

  function describeModel(info) {
    const m = info.model, heads = [m.itm && "ITM", m.mlm && "MLM", m.vqa && "VQA"].filter(Boolean);
    return `Model: ${m.source} (${m.task}; ${m.layers} layers x ${m.heads} heads; images ${m.image_side[0]}-` +
      `${m.image_side[1]} px, feature cells of ${m.stride} px; at most ${m.max_text_len} tokens; ` +
      `heads: ${heads.join(", ") || "none"}).`;
  }

  function wireControls() {
    $("layer").addEventListener("input", redraw);
    $("head").addEventListener("change", redraw);
    $("show-grid").addEventListener("change", drawGrid);
    $("grid-canvas").addEventListener("click", (event) => {
      const r = state.result;
      if (!r) return;
      const bounds = event.target.getBoundingClientRect();
      const x = (event.clientX - bounds.left) / r.scale, y = (event.clientY - bounds.top) / r.scale;
      const col = Math.min(r.grid[1] - 1, Math.floor(x / r.stride)), row = Math.min(r.grid[0] - 1, Math.floor(y / r.stride));
      const k = row * r.grid[1] + col;
      state.cell = state.cell === k || !r.valid[k] ? null : k;  // a second click closes the panel
      redraw();
    });
    $("query").addEventListener("submit", (event) => { event.preventDefault(); run(); });
    $("upload").addEventListener("change", (event) => chooseUpload(event.target.files[0]));
  }

  async function start() {
    drawLegend();
    wireControls();
    const inline = document.getElementById("explorer-data");
    if (inline) {  // the --html file: one saved result, no server
      const data = JSON.parse(inline.textContent);
      state.staticPage = true;
      state.info = data.info;
      $("query").hidden = true;
      $("model-line").textContent = describeModel(data.info);
      const note = $("saved-note");
      note.hidden = false;
      note.textContent = `Saved view of \u201c${data.result.text}\u201d on ${data.result.source}. ` +
        "To try other images and sentences, serve the model: python -m pixel_bert.explore --checkpoint RUN/model";
      await showResult(data.result);
      state.done++;
      setStatus("ready", "saved page: every layer and head is in this file");
      return;
    }
    try {
      const response = await fetch("api/info");
      state.info = await response.json();
    } catch (e) {
      showMessage(`cannot reach the explorer's server (${e.message})`);
      setStatus("error", "");
      return;
    }
    $("model-line").textContent = describeModel(state.info);
    state.info.scenes.forEach((scene, index) => {
      const button = element("button", {type: "button", title: scene.name},
        [element("img", {src: scene.image, alt: scene.name})]);
      button.dataset.index = String(index);
      button.setAttribute("role", "radio");
      button.addEventListener("click", () => chooseScene(index));
      $("scenes").append(button);
    });
    chooseScene(0);
  }

  start();
})();
