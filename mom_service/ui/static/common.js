// What both pages share: the token (asked once, kept in this tab's session storage), API calls carrying it,
// and the formats of numbers. No secret is in any page: the token is the one the user types.

export const TOKEN_KEY = "mom-ui-token";

export class TokenRefused extends Error {}

export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

function forget(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  showTokenForm(message);
}

let onTokenReady = () => {};

function showTokenForm(message) {
  document.getElementById("app").hidden = true;
  document.getElementById("forget-token").hidden = true;
  document.getElementById("token-section").hidden = false;
  document.getElementById("token-error").textContent = message || "";
  const input = document.getElementById("token");
  input.value = "";
  input.focus();
}

function showApp() {
  document.getElementById("token-section").hidden = true;
  document.getElementById("forget-token").hidden = false;
  document.getElementById("app").hidden = false;
}

// The token's form, and the button that forgets it (in the page's header).
function tokenForm() {
  const form = el("form", { id: "token-form" });
  form.append(
    el("label", { for: "token" }, "The service's API token (kept in this tab's session storage only)"),
    el("input", { id: "token", name: "token", type: "password", autocomplete: "off", required: "" }),
    el("button", { type: "submit" }, "Use this token"),
    el("p", { id: "token-error", class: "error", role: "alert" }),
  );
  document.getElementById("token-section").append(el("h2", { id: "token-title" }, "API token"), form);
  const forgetButton = el("button", { type: "button", id: "forget-token", class: "link" }, "Forget token");
  forgetButton.hidden = true;
  document.querySelector("header.top").append(forgetButton);
}

// Ask for the token unless this tab has one, then run `ready` (again after a refused token is replaced).
export function withToken(ready) {
  onTokenReady = ready;
  tokenForm();
  document.getElementById("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = document.getElementById("token").value.trim();
    if (!value) return;
    sessionStorage.setItem(TOKEN_KEY, value);
    showApp();
    onTokenReady();
  });
  document.getElementById("forget-token").addEventListener("click", () => forget(""));
  if (token()) {
    showApp();
    onTokenReady();
  } else {
    showTokenForm("");
  }
}

export function authHeaders() {
  return { Authorization: `Bearer ${token()}` };
}

// A fetch of the service's API with the token; a 401 forgets the token and asks for another.
export async function api(path, init = {}) {
  const response = await fetch(path, { ...init, headers: { ...authHeaders(), ...(init.headers || {}) } });
  if (response.status === 401) {
    forget("The service refused this token: type it again.");
    throw new TokenRefused("token refused");
  }
  return response;
}

// The message of an API error body (OpenAI's shape), else the status.
export async function errorText(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return `${response.status}: ${body.error.message}`;
  } catch (_) {
    // not JSON: the status says it
  }
  return `${response.status} ${response.statusText}`;
}

export async function getJson(path) {
  const response = await api(path);
  if (!response.ok) throw new Error(await errorText(response));
  return response.json();
}

export function usd(value) {
  if (value === null || value === undefined) return "unpriced";
  if (value === 0) return "$0";
  return `$${value < 0.01 ? value.toPrecision(3) : value.toFixed(4)}`;
}

export function ms(value) {
  if (value === null || value === undefined) return "–";
  return value >= 1000 ? `${(value / 1000).toFixed(2)} s` : `${Math.round(value)} ms`;
}

export function count(value) {
  if (value === null || value === undefined) return "–";
  return value.toLocaleString("en-US");
}

// An element with text and attributes, its text set as text (never parsed as HTML).
export function el(tag, attributes = {}, text = "") {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  if (text) node.textContent = text;
  return node;
}
