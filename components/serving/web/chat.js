// seedlm chat page: talks to the same server's OpenAI-compatible API (/v1/models, /v1/chat/completions with
// stream: true). No libraries, nothing fetched from elsewhere: it works offline.
"use strict";

const API = "/v1";
const KEY_STORE = "seedlm.apiKey";
const $ = (id) => document.getElementById(id);
const state = { messages: [], busy: false, controller: null };

function headers() {
  const key = $("api-key").value.trim();
  const h = { "Content-Type": "application/json" };
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function showError(text) {
  $("error").textContent = text || "";
  $("error").hidden = !text;
}

async function errorText(resp) {
  let detail = resp.statusText;
  try {
    const body = await resp.json();
    detail = (body.error && body.error.message) || body.detail || JSON.stringify(body);
  } catch (e) { /* not JSON: keep the status text */ }
  if (resp.status === 401 || resp.status === 403) {
    $("settings").open = true;
    $("api-key").focus();
    return `The server wants an API key (${resp.status}): enter it under Settings. ${detail}`;
  }
  return `Error ${resp.status}: ${detail}`;
}

// "seedlm/3"; the fingerprint only where it adds something (e.g. not "models:/seedlm/3" for "seedlm/3").
function versionLabel(model, fingerprint) {
  const m = String(model || ""), f = String(fingerprint || "");
  return f && !f.includes(m) && !m.includes(f) ? `${m} (${f})` : m;
}

async function loadModels() {
  try {
    const resp = await fetch(`${API}/models`, { headers: headers() });
    if (!resp.ok) throw new Error(await errorText(resp));
    const models = (await resp.json()).data || [];
    showError("");
    $("model-select").replaceChildren(...models.map((m) => new Option(m.label || m.id, m.id)));
    $("model-label").textContent = models.length ? models[0].label || models[0].id : "none served";
    const rag = Boolean(models.length && models[0].rag);  // the server has a retrieval index
    $("rag").hidden = $("rag-label").hidden = !rag;
    $("rag").disabled = !rag;
    if (!models.length) showError("The server serves no model.");
  } catch (e) {
    $("model-label").textContent = "unavailable";
    showError(e.message);
  }
}

function addMessage(role, text) {
  const li = document.createElement("li");
  li.className = `msg ${role}`;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Assistant";
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text;
  li.append(who, content);
  $("log").append(li);
  $("empty").hidden = true;
  li.scrollIntoView({ block: "end" });
  return li;
}

// A retrieval source: {n, source, location, text, score, ...} (retrieval/context.py), or a plain string.
function sourceItem(src) {
  const li = document.createElement("li");
  if (typeof src !== "object" || src === null) {
    li.textContent = String(src);
    return li;
  }
  if (Number.isInteger(src.n)) li.value = src.n;  // the [n] the answer may cite
  const title = src.title || src.source || src.path || src.url || src.id || "source";
  const head = document.createElement(src.url ? "a" : "strong");
  head.textContent = title;
  if (src.url) head.href = src.url;
  li.append(head);
  if (src.location) li.append(document.createTextNode(` (${src.location})`));
  const text = src.text || src.snippet || src.content;
  if (text) li.append(document.createTextNode(` — ${String(text).slice(0, 300)}`));
  if (typeof src.score === "number") li.append(document.createTextNode(` (score ${src.score.toFixed(3)})`));
  return li;
}

function showSources(li, sources) {
  if (!Array.isArray(sources) || !sources.length) return;
  let box = li.querySelector(".sources");
  if (!box) {
    box = document.createElement("details");
    box.className = "sources";
    box.open = true;
    box.append(Object.assign(document.createElement("summary"), { textContent: "Sources" }), document.createElement("ol"));
    li.append(box);
  }
  box.querySelector("ol").replaceChildren(...sources.map(sourceItem));
}

function showMeta(li, model, fingerprint, note) {
  let meta = li.querySelector(".meta");
  if (!meta) {
    meta = document.createElement("small");
    meta.className = "meta";
    li.append(meta);
  }
  const label = versionLabel(model, fingerprint);
  meta.textContent = [label, note].filter(Boolean).join(" · ");
  meta.title = fingerprint ? `system_fingerprint: ${fingerprint}` : "";
  $("model-label").textContent = label;
}

// One server-sent event's data (a chat.completion.chunk) applied to the answer being shown.
function applyChunk(li, chunk, answer) {
  if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
  const choice = (chunk.choices || [])[0] || {};
  const delta = choice.delta || choice.message || {};
  if (delta.content) {
    answer.text += delta.content;
    li.querySelector(".content").textContent = answer.text;
  }
  showSources(li, chunk.sources || delta.sources);
  if (chunk.model) answer.model = chunk.model;
  if (chunk.system_fingerprint) answer.fingerprint = chunk.system_fingerprint;
  if (choice.finish_reason) answer.finish = choice.finish_reason;
  if (chunk.trimmed_messages) answer.trimmed = chunk.trimmed_messages;
}

// Parse an SSE body: events end with a blank line; each `data:` line holds JSON or [DONE].
async function readStream(resp, onData) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
    const events = buffer.split(/\r?\n\r?\n/);
    buffer = done ? "" : events.pop();
    for (const event of events) {
      const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (data === "[DONE]") return;
      if (data) onData(JSON.parse(data));
    }
    if (done) return;
  }
}

function notes(answer) {
  const out = [];
  if (answer.finish === "length") out.push("cut at max tokens");
  if (answer.trimmed) out.push(`${answer.trimmed} oldest messages left out to fit the context`);
  return out.join(" · ");
}

function setBusy(busy) {
  state.busy = busy;
  $("send").disabled = busy;
  $("stop").hidden = !busy;
  $("log").setAttribute("aria-busy", String(busy));
}

async function ask(question) {
  showError("");
  const messages = state.messages;  // this conversation's; "New conversation" starts another array
  messages.push({ role: "user", content: question });
  addMessage("user", question);
  const li = addMessage("assistant", "");
  li.classList.add("streaming");
  const answer = { text: "", model: $("model-select").value, fingerprint: "", finish: "", trimmed: 0 };
  state.controller = new AbortController();
  setBusy(true);
  try {
    const body = { model: answer.model, messages, stream: true,
                   max_tokens: Number($("max-tokens").value) || undefined,
                   rag: $("rag").disabled ? undefined : $("rag").checked };
    const resp = await fetch(`${API}/chat/completions`, { method: "POST", headers: headers(),
                                                          body: JSON.stringify(body), signal: state.controller.signal });
    if (!resp.ok) throw new Error(await errorText(resp));
    await readStream(resp, (chunk) => applyChunk(li, chunk, answer));
    messages.push({ role: "assistant", content: answer.text });
    showMeta(li, answer.model, answer.fingerprint, notes(answer));
  } catch (e) {
    const stopped = e.name === "AbortError";
    if (stopped && answer.text) messages.push({ role: "assistant", content: answer.text });
    else messages.pop();  // unanswered: not part of the conversation the model sees
    li.classList.add(stopped ? "stopped" : "failed");
    showMeta(li, answer.model, answer.fingerprint, stopped ? "stopped" : "failed");
    if (!stopped) showError(e.message);
  } finally {
    li.classList.remove("streaming");
    setBusy(false);
    state.controller = null;
  }
}

function newConversation() {
  if (state.controller) state.controller.abort();
  state.messages = [];
  $("log").replaceChildren();
  $("empty").hidden = false;
  showError("");
  $("question").focus();
}

document.addEventListener("DOMContentLoaded", () => {
  $("api-key").value = localStorage.getItem(KEY_STORE) || "";
  $("api-key").addEventListener("change", () => {
    localStorage.setItem(KEY_STORE, $("api-key").value.trim());
    loadModels();
  });
  $("ask").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const question = $("question").value.trim();
    if (!question || state.busy) return;
    $("question").value = "";
    ask(question);
  });
  $("question").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      $("ask").requestSubmit();
    }
  });
  $("settings-form").addEventListener("submit", (ev) => ev.preventDefault());
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("new-chat").addEventListener("click", newConversation);
  loadModels();
  $("question").focus();
});
