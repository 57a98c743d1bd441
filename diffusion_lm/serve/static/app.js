// The chat page: sends the conversation to /v1/chat/completions with stream: true and renders every
// server-sent state of the answer: masked slots grey, each token appearing in its slot when committed.
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = [];  // [{role, content}] sent with every request
let modelId = null;

function apiHeaders() {
  const headers = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) headers["Authorization"] = "Bearer " + key;
  return headers;
}

function numberField(id, integer) {
  const raw = $(id).value.trim();
  if (raw === "") return undefined;
  return integer ? parseInt(raw, 10) : parseFloat(raw);
}

function requestBody() {
  const body = { model: modelId || undefined, messages: conversation.slice(), stream: true };
  const put = (obj, name, value) => { if (value !== undefined && !Number.isNaN(value)) obj[name] = value; };
  put(body, "max_tokens", numberField("max_tokens", true));
  put(body, "temperature", numberField("temperature", false));
  put(body, "top_p", numberField("top_p", false));
  put(body, "seed", numberField("seed", true));
  const diffusion = {};
  if ($("preset").value) diffusion.preset = $("preset").value;
  put(diffusion, "steps", numberField("steps", true));
  put(diffusion, "threshold", numberField("threshold", false));
  put(diffusion, "block_size", numberField("block_size", true));
  put(diffusion, "top_k", numberField("top_k", true));
  if (Object.keys(diffusion).length) body.diffusion = diffusion;
  return body;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.dir = "auto";
  if (text !== undefined) div.textContent = text;
  $("log").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

// One assistant bubble: .answer holds one span per canvas slot while streaming, the answer at the end.
function answerView(bubble) {
  const answer = document.createElement("span");
  answer.className = "answer";
  answer.dir = "auto";
  const meta = document.createElement("span");
  meta.className = "meta";
  bubble.append(answer, meta);
  let previous = [];

  return {
    state(d) {
      const slots = d.slots || [];
      const spans = slots.map((text, i) => {
        const span = document.createElement("span");
        if (text === null) {
          span.className = "slot masked";
          span.textContent = "\u2592";
        } else {
          span.className = previous[i] === null || previous[i] === undefined ? "slot fresh" : "slot";
          span.textContent = i === 0 ? text.trimStart() : text;  // a word-start piece carries its space
        }
        return span;
      });
      answer.replaceChildren(...spans);
      previous = slots;
      answer.dataset.step = String(d.step);
      answer.dataset.masked = String(d.masked);
      meta.textContent = `step ${d.step} · ${d.masked} masked`;
    },
    done(content, d) {
      answer.textContent = content;
      answer.dataset.step = String(d ? d.step : "");
      answer.dataset.masked = "0";
      answer.dataset.done = "1";
      if (d) {
        meta.textContent = `${d.nfe} forward passes · ${Number(d.tokens_per_forward).toFixed(2)} tokens per ` +
          `forward · seed ${d.seed} · batch of ${d.batch_size} · ${Number(d.seconds).toFixed(2)} s`;
      }
    },
  };
}

async function errorText(response) {
  try {
    const body = await response.json();
    const e = body.error || {};
    return `${response.status}: ${e.message || response.statusText}` + (e.param ? ` (field: ${e.param})` : "");
  } catch (_) {
    return `${response.status} ${response.statusText}`;
  }
}

// Yields the JSON payload of every `data:` event of a server-sent event stream until [DONE].
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;  // ":" lines are keep-alive comments
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function send(text) {
  conversation.push({ role: "user", content: text });
  addMessage("user", text);
  const bubble = addMessage("assistant");
  const view = answerView(bubble);
  $("send").disabled = true;
  let content = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: apiHeaders(), body: JSON.stringify(requestBody()),
    });
    if (!response.ok) throw new Error(await errorText(response));
    let last = null;
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = (chunk.choices || [])[0];
      if (choice && choice.delta && choice.delta.content) content += choice.delta.content;
      if (chunk.diffusion) {
        last = chunk.diffusion;
        if (!last.done) view.state(last);
      }
    }
    view.done(content, last);
    conversation.push({ role: "assistant", content });
  } catch (err) {
    conversation.pop();  // the failed user turn is not part of the conversation
    bubble.classList.add("error");
    bubble.textContent = String(err.message || err);
  } finally {
    $("send").disabled = false;
    bubble.scrollIntoView({ block: "end" });
  }
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", { headers: apiHeaders() });
    if (!response.ok) throw new Error(await errorText(response));
    const card = (await response.json()).data[0];
    modelId = card.id;
    $("model").textContent = `${card.id} · up to ${card.max_model_len} positions · ` +
      `default canvas ${card.diffusion.default_max_tokens}`;
    $("max_tokens").placeholder = String(card.diffusion.default_max_tokens);
  } catch (err) {
    $("model").textContent = "model list unavailable: " + (err.message || err);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("api_key").value = localStorage.getItem("diffusion-lm-api-key") || "";
  $("api_key").addEventListener("change", () => {
    localStorage.setItem("diffusion-lm-api-key", $("api_key").value.trim());
    loadModel();
  });
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || $("send").disabled) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("new-chat").addEventListener("click", () => {
    conversation.length = 0;
    $("log").replaceChildren();
  });
  loadModel();
});
