"use strict";
// The chat page: sidebar settings, attachments, and one streamed /v1/chat/completions request per turn.
const $ = (id) => document.getElementById(id);
// toolCalls: the calls of the last reply still waiting for their results (the composer sends those next).
const state = { model: null, history: [], pending: [], lastImage: null, controller: null, toolCalls: [] };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("apiKey").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.status);
    state.model = body.data[0].id;
    $("model").textContent = state.model;
  } catch (e) { $("model").textContent = "not connected: " + e.message; }
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const fr = new FileReader();
    fr.onload = () => resolve(fr.result);
    fr.onerror = () => reject(fr.error);
    fr.readAsDataURL(file);
  });
}

async function addFiles(files) {
  for (const f of files) {
    if (!f.type.startsWith("image/")) continue;
    state.pending.push(await readFile(f));
  }
  drawPending();
}

function drawPending() {
  const box = $("pending");
  box.textContent = "";
  state.pending.forEach((url, i) => {
    const fig = document.createElement("figure");
    const img = document.createElement("img");
    img.src = url;
    const x = document.createElement("button");
    x.textContent = "×";
    x.title = "Remove";
    x.onclick = () => { state.pending.splice(i, 1); drawPending(); };
    fig.append(img, x);
    box.append(fig);
  });
}

function showReasoning(div, body, text) {
  let box = div.querySelector("details.reasoning");
  if (!box) {
    box = document.createElement("details");
    box.className = "reasoning";
    const summary = document.createElement("summary");
    summary.textContent = "Reasoning";
    const inner = document.createElement("div");
    inner.className = "text";
    box.append(summary, inner);
    div.insertBefore(box, body);
  }
  box.querySelector(".text").textContent = text;
}

function bubble(role, label) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = label || (role === "user" ? "You" : "Assistant");
  const body = document.createElement("div");
  body.className = "body";
  div.append(who, body);
  $("log").append(div);
  return div;
}

function drawBoxes(div, imageUrl, boxes) {
  if (!imageUrl || !boxes.length) return;
  const wrap = document.createElement("div");
  wrap.className = "ground";
  const img = document.createElement("img");
  const canvas = document.createElement("canvas");
  img.onload = () => {
    canvas.width = img.clientWidth; canvas.height = img.clientHeight;
    const ctx = canvas.getContext("2d");
    const colors = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4"];
    ctx.lineWidth = 2; ctx.font = "13px sans-serif";
    boxes.forEach(({ label, box }, i) => {
      const [x1, y1, x2, y2] = box.map((v, k) => v / 1000 * (k % 2 ? canvas.height : canvas.width));
      ctx.strokeStyle = ctx.fillStyle = colors[i % colors.length];
      ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
      const w = ctx.measureText(label).width + 6;
      ctx.fillRect(x1, Math.max(0, y1 - 16), w, 16);
      ctx.fillStyle = "#fff";
      ctx.fillText(label, x1 + 3, Math.max(12, y1 - 4));
    });
    div.dataset.boxes = String(boxes.length);
  };
  img.src = imageUrl;
  wrap.append(img, canvas);
  div.append(wrap);
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

// The request for this turn from the sidebar's settings; throws (before anything is sent) on a bad tools list.
function buildRequest(turn) {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...state.history, turn);
  const request = { model: state.model, messages, stream: true, stream_options: { include_usage: true },
                    temperature: parseFloat($("temperature").value), max_tokens: parseInt($("maxTokens").value) || 512 };
  const tiles = parseInt($("maxTiles").value);
  if (tiles) request.max_tiles = tiles;
  const thinking = $("thinking").value;
  if (thinking) request.chat_template_kwargs = { enable_thinking: thinking === "on" };
  if ($("json").checked) request.response_format = { type: "json_object" };
  const tools = $("tools").value.trim();
  if (tools) {
    try { request.tools = JSON.parse(tools); } catch (e) { throw new Error("the Tools field is not JSON: " + e.message); }
    if (!Array.isArray(request.tools)) throw new Error("the Tools field must be a JSON list of tools");
  }
  return request;
}

// Read an SSE body of chat.completion.chunk events, handing each parsed chunk to onChunk.
async function readEvents(response, onChunk) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const obj = JSON.parse(line.slice(6));
        if (obj.error) throw new Error(obj.error.message);
        onChunk(obj);
      }
    }
  }
}

// Run `change` to the log; if the log was scrolled to its end, keep it there.
function following(change) {
  const log = $("log");
  const atEnd = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
  change();
  if (atEnd) log.scrollTop = log.scrollHeight;
}

// One assistant reply as it streams: answer text (Markdown, or JSON in JSON mode), reasoning, tool calls.
function replyView(div, jsonMode) {
  const body = div.querySelector(".body");
  const calls = document.createElement("div");
  calls.className = "tool-calls";
  div.append(calls);
  const render = jsonMode ? mlxRender.renderJSON : mlxRender.renderMarkdown;
  const r = { text: "", reasoning: "", toolCalls: [], usage: null, finish: null, tFirst: null,
              view: mlxRender.liveView(body, (el, text) => following(() => render(el, text))) };
  r.onChunk = (obj) => {
    if (obj.usage) r.usage = obj.usage;
    for (const c of obj.choices || []) {
      const d = c.delta || c.message || {};
      if ((d.content || d.reasoning_content || d.tool_calls) && r.tFirst === null) r.tFirst = performance.now();
      if (d.reasoning_content) {  // shown folded above the answer
        r.reasoning += d.reasoning_content;
        showReasoning(div, body, r.reasoning);
      }
      if (d.content) {
        r.text += d.content;
        r.view.update(r.text);
      }
      if (d.tool_calls) {
        mlxRender.mergeToolCalls(r.toolCalls, d.tool_calls);
        following(() => mlxRender.renderToolCalls(calls, r.toolCalls));
      }
      if (c.finish_reason) r.finish = c.finish_reason;
    }
  };
  return r;
}

function showStats(stats, r, t0, tEnd) {
  const parts = [];
  if (r.tFirst !== null) parts.push(`TTFT ${((r.tFirst - t0) / 1000).toFixed(2)} s`);
  if (r.usage && r.tFirst !== null && r.usage.completion_tokens > 1 && tEnd > r.tFirst)
    parts.push(`${((r.usage.completion_tokens - 1) / ((tEnd - r.tFirst) / 1000)).toFixed(1)} tokens/s`);
  if (r.usage) {
    const cached = (r.usage.prompt_tokens_details || {}).cached_tokens || 0;
    parts.push(`${r.usage.prompt_tokens} prompt tokens (${cached} cached), ${r.usage.completion_tokens} generated`);
  }
  if (r.finish) parts.push(r.finish);
  stats.textContent = parts.join(" · ");
}

function userTurn(text, images) {
  const content = images.length
    ? [{ type: "text", text }, ...images.map((url) => ({ type: "image_url", image_url: { url } }))]
    : text;
  const userDiv = bubble("user");
  userDiv.querySelector(".body").textContent = text;
  if (images.length) {
    const t = document.createElement("div");
    t.className = "thumbs";
    for (const url of images) { const i = document.createElement("img"); i.src = url; t.append(i); }
    userDiv.append(t);
    state.lastImage = images[images.length - 1];
  }
  return { role: "user", content };
}

// The composer's text as the result of the next pending tool call (role "tool", OpenAI's shape).
function toolTurn(text) {
  const call = state.toolCalls.shift();
  bubble("tool", `Result of ${call.function.name} (${call.id})`).querySelector(".body").textContent = text;
  askForToolResult();
  return { role: "tool", tool_call_id: call.id, content: text };
}

function askForToolResult() {
  const call = state.toolCalls[0];
  $("input").placeholder = call ? `Result of ${call.function.name}(…) to send back (${call.id})`
                                : "Ask about an image… (Enter sends, Shift+Enter: new line)";
}

function showError(div, message) {
  const err = document.createElement("div");
  err.className = "error";
  err.textContent = "Error: " + message;
  div.append(err);
}

async function send() {
  const text = $("input").value.trim();
  if ((!text && !state.pending.length) || state.controller) return;
  $("input").value = "";
  let turn;
  if (state.toolCalls.length) {  // each pending call gets its result; the request goes when all have one
    turn = toolTurn(text);
    if (state.toolCalls.length) { state.history.push(turn); return; }
  } else {
    turn = userTurn(text, state.pending.splice(0));
    drawPending();
  }
  const div = bubble("assistant");
  const stats = document.createElement("div");
  stats.className = "stats";
  const r = replyView(div, $("json").checked);
  div.append(stats);
  state.controller = new AbortController();
  setBusy(true);
  const t0 = performance.now();
  try {
    const request = buildRequest(turn);
    const resp = await fetch("/v1/chat/completions", { method: "POST", headers: headers(),
                                                       body: JSON.stringify(request), signal: state.controller.signal });
    if (!resp.ok) {
      const err = await resp.json().catch(() => ({}));
      throw new Error(err.error ? err.error.message : "HTTP " + resp.status);
    }
    await readEvents(resp, r.onChunk);
  } catch (e) {
    if (e.name !== "AbortError") showError(div, e.message);
    else r.finish = "stopped";
  } finally {
    state.controller = null;
    setBusy(false);
  }
  r.view.flush();
  if (r.text || r.toolCalls.length) {
    const answer = { role: "assistant", content: r.text || null };
    if (r.toolCalls.length) answer.tool_calls = r.toolCalls;
    state.history.push(turn, answer);
    state.toolCalls = r.toolCalls.slice();
    askForToolResult();
  }
  showStats(stats, r, t0, performance.now());
  if (r.text) drawBoxes(div, state.lastImage, mlxRender.parseGrounding(r.text));
  div.dataset.done = "1";
}

$("send").onclick = send;
$("stop").onclick = () => state.controller && state.controller.abort();
$("input").addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); } });
$("attach").onclick = () => $("file").click();
$("file").onchange = (e) => { addFiles(e.target.files); e.target.value = ""; };
$("temperature").oninput = (e) => { $("tval").textContent = e.target.value; };
$("clear").onclick = () => {
  if (state.controller) state.controller.abort();
  state.history = []; state.pending = []; state.lastImage = null; state.toolCalls = [];
  askForToolResult();
  $("log").textContent = ""; drawPending();
};
document.addEventListener("paste", (e) => {
  const files = [...(e.clipboardData || {}).items || []].filter((i) => i.kind === "file").map((i) => i.getAsFile());
  if (files.length) { e.preventDefault(); addFiles(files); }
});
const composer = $("composer");
["dragenter", "dragover"].forEach((t) => document.addEventListener(t, (e) => {
  e.preventDefault(); composer.classList.add("drag");
}));
["dragleave", "drop"].forEach((t) => document.addEventListener(t, (e) => {
  e.preventDefault(); composer.classList.remove("drag");
}));
document.addEventListener("drop", (e) => { if (e.dataTransfer) addFiles(e.dataTransfer.files); });
$("apiKey").onchange = loadModel;
window.mlxChat = { state, parseGrounding: mlxRender.parseGrounding, drawBoxes, addFiles, render: mlxRender };
loadModel();
