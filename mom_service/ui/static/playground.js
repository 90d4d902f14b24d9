// The playground: a MoM model, a question (and an image where the model can see), the `mom` controls; the run
// streamed (run.js); the request copied as curl or as Python (the OpenAI SDK).

import { TokenRefused, api, el, errorText, getJson, withToken } from "./common.js";
import { Run, follow, readChat } from "./run.js";

const $ = (id) => document.getElementById(id);
let models = new Map(); // id -> model object of /v1/models
let image = null; // the attached image as a data: URL
const run = new Run();

async function loadModels() {
  const listing = await getJson("/v1/models");
  models = new Map(listing.data.map((m) => [m.id, m]));
  const select = $("model");
  const previous = select.value;
  select.replaceChildren(...listing.data.map((m) => el("option", { value: m.id }, m.id)));
  if (models.has(previous)) select.value = previous;
  modelChanged();
}

function modelChanged() {
  const model = models.get($("model").value);
  if (!model) return;
  const panel = model.panel || { members: [], strategy: "synthesize", steerable: true };
  const vision = Boolean(model.capabilities && model.capabilities.vision);
  $("image-row").hidden = !vision;
  if (!vision) clearImage();
  $("strategy").options[0].textContent = `the model's own (${panel.strategy})`;
  $("strategy").value = "";
  const boxes = panel.members.map((name, index) => {
    const label = el("label");
    const box = el("input", { type: "checkbox", name: "member", value: name, id: `member-${index}` });
    box.checked = true;
    label.append(box, document.createTextNode(name));
    return label;
  });
  $("members").replaceChildren(el("legend", {}, "Members asked"), ...boxes);
  $("controls-locked").hidden = panel.steerable;
  $("strategy").disabled = !panel.steerable;
  $("thinking").disabled = !panel.steerable;
  for (const box of $("members").querySelectorAll("input")) box.disabled = !panel.steerable;
}

function clearImage() {
  image = null;
  $("image").value = "";
  $("image-preview").hidden = true;
  $("image-preview").removeAttribute("src");
}

function imageChosen() {
  const file = $("image").files[0];
  if (!file) return clearImage();
  const reader = new FileReader();
  reader.onload = () => {
    image = String(reader.result);
    $("image-preview").src = image;
    $("image-preview").hidden = false;
  };
  reader.readAsDataURL(file);
}

// The request as the form says, or an error message.
function request() {
  const model = models.get($("model").value);
  const question = $("question").value.trim();
  if (!model) return { error: "Choose a MoM model." };
  if (!question) return { error: "Type a question." };
  const content = image
    ? [{ type: "text", text: question }, { type: "image_url", image_url: { url: image } }]
    : question;
  const body = { model: model.id, messages: [{ role: "user", content }], stream: true,
    stream_options: { include_usage: true } };
  // members streamed, so that their columns fill as they write (docs/progress.md)
  const mom = { stream_members: "on" };
  if ($("strategy").value) mom.strategy = $("strategy").value;
  if ($("thinking").value) mom.thinking = $("thinking").value;
  const chosen = [...$("members").querySelectorAll("input:checked")].map((box) => box.value);
  if (chosen.length === 0) return { error: "Choose at least one member." };
  if (chosen.length < model.panel.members.length) mom.only = chosen;
  if (model.panel.steerable && Object.keys(mom).length > 0) body.mom = mom;
  return { body };
}

async function ask(event) {
  event.preventDefault();
  const { body, error } = request();
  $("ask-error").textContent = error || "";
  if (error) return;
  run.reset();
  run.say("Asking the panel…");
  $("ask").disabled = true;
  let progress = null;
  try {
    const response = await api("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    if (!response.ok) {
      run.fail(await errorText(response));
      return;
    }
    const url = response.headers.get("X-MoM-Progress-Url");
    if (url) progress = follow(url, run);
    await readChat(response, run);
  } catch (failure) {
    if (!(failure instanceof TokenRefused)) run.fail(String(failure.message || failure));
  } finally {
    $("ask").disabled = false;
    // the progress stream ends with run_done; should it lag behind, the breakdown has the final figures
    if (progress) setTimeout(() => progress.close(), 10000);
  }
}

// ---- copy as curl, as Python

function shellQuote(text) {
  return `'${text.replaceAll("'", "'\\''")}'`;
}

export function asCurl(body) {
  return [
    `curl -sN ${location.origin}/v1/chat/completions \\`,
    `  -H "Authorization: Bearer $API_TOKEN" -H "Content-Type: application/json" \\`,
    `  -d ${shellQuote(JSON.stringify(body))}`,
  ].join("\n");
}

// A JSON value as a Python literal (JSON's strings are Python's).
function py(value, indent = "") {
  if (value === null) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (typeof value !== "object") return JSON.stringify(value);
  const inner = `${indent}    `;
  if (Array.isArray(value)) {
    if (value.length === 0) return "[]";
    return `[\n${value.map((v) => inner + py(v, inner)).join(",\n")},\n${indent}]`;
  }
  const entries = Object.entries(value);
  if (entries.length === 0) return "{}";
  return `{\n${entries.map(([k, v]) => `${inner}${JSON.stringify(k)}: ${py(v, inner)}`).join(",\n")},\n${indent}}`;
}

export function asPython(body) {
  const args = [`    model=${py(body.model)},`, `    messages=${py(body.messages, "    ")},`, "    stream=True,",
    `    stream_options=${py(body.stream_options, "    ")},`];
  if (body.mom) args.push(`    extra_body=${py({ mom: body.mom }, "    ")},`);
  return [
    "import os",
    "",
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url=${py(`${location.origin}/v1`)}, api_key=os.environ["API_TOKEN"])`,
    "stream = client.chat.completions.create(",
    ...args,
    ")",
    "for chunk in stream:",
    "    if chunk.choices and chunk.choices[0].delta.content:",
    "        print(chunk.choices[0].delta.content, end=\"\", flush=True)",
    "    if chunk.usage:",
    "        print(\"\\ncost (USD):\", chunk.usage.model_extra[\"cost\"])",
    "",
  ].join("\n");
}

async function copy(kind) {
  const { body, error } = request();
  $("ask-error").textContent = error || "";
  if (error) return;
  const text = kind === "curl" ? asCurl(body) : asPython(body);
  $("copied").textContent = text;
  $("copied").dataset.kind = kind;
  $("copied-section").hidden = false;
  const where = kind === "curl" ? "a shell" : "Python";
  try {
    await navigator.clipboard.writeText(text);
    $("copied-note").textContent = `Copied to the clipboard: run it in ${where} with API_TOKEN set.`;
  } catch (_) {
    $("copied-note").textContent = `The clipboard is not available here: select the text below to copy it.`;
  }
}

function start() {
  $("model").addEventListener("change", modelChanged);
  $("image").addEventListener("change", imageChosen);
  $("ask-form").addEventListener("submit", ask);
  $("copy-curl").addEventListener("click", () => copy("curl"));
  $("copy-python").addEventListener("click", () => copy("python"));
  // Enter asks (Shift+Enter: a new line), as chat boxes do
  $("question").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("ask-form").requestSubmit();
    }
  });
  withToken(() => loadModels().catch((failure) => {
    if (!(failure instanceof TokenRefused)) $("ask-error").textContent = `Could not list the models: ${failure.message}`;
  }));
}

start();
