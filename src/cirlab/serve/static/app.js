// The search page: choose a reference (upload or gallery), type a modification, show the ranked results.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { reference: null, galleryOffset: 0, galleryTotal: 0 };

function setStatus(message, isError = false) {
  $("status").textContent = message;
  $("status").classList.toggle("error", isError);
}

function showReference(src, label) {
  const preview = $("ref-preview");
  preview.classList.remove("empty");
  preview.replaceChildren(Object.assign(document.createElement("img"), { src, alt: "reference image" }));
  $("ref-label").textContent = label;
}

function useGalleryItem(item) {
  state.reference = { kind: "gallery", id: item.id };
  showReference(item.thumb_url, `gallery: ${item.path}`);
}

function card(item, extra) {
  const el = document.createElement("div");
  el.className = "card";
  el.title = item.path;
  const img = Object.assign(document.createElement("img"), { src: item.thumb_url, alt: item.path, loading: "lazy" });
  el.append(img);
  if (extra) extra(el);
  return el;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (typeof body.detail === "string") return body.detail;
    if (Array.isArray(body.detail)) return body.detail.map((d) => `${d.loc.slice(-1)[0]}: ${d.msg}`).join("; ");
  } catch (_) { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}

async function loadInfo() {
  const response = await fetch("/api/info");
  if (!response.ok) { $("summary").textContent = await errorMessage(response); return; }
  const info = await response.json();
  $("summary").textContent = info.description;
  for (const name of info.methods) {
    $("method").append(Object.assign(document.createElement("option"), { value: name, textContent: name }));
  }
  $("method").value = info.method;
}

async function loadGalleryPage() {
  const response = await fetch(`/api/gallery?offset=${state.galleryOffset}&limit=60`);
  if (!response.ok) return;
  const page = await response.json();
  state.galleryTotal = page.total;
  state.galleryOffset += page.items.length;
  for (const item of page.items) {
    const el = card(item);
    el.dataset.id = item.id;
    el.addEventListener("click", () => { useGalleryItem(item); $("gallery-dialog").close(); });
    $("gallery-grid").append(el);
  }
  $("gallery-count").textContent = `${state.galleryOffset} of ${state.galleryTotal} images`;
  $("more-gallery").hidden = state.galleryOffset >= state.galleryTotal;
}

function renderResults(result) {
  const grid = $("results");
  grid.replaceChildren();
  if (!result.results.length) {
    grid.append(Object.assign(document.createElement("p"), { className: "placeholder muted", textContent: "No results." }));
  }
  for (const hit of result.results) {
    grid.append(card(hit, (el) => {
      el.classList.add("result");
      const rank = Object.assign(document.createElement("span"), { className: "rank", textContent: `#${hit.rank}` });
      const meta = document.createElement("div");
      meta.className = "meta";
      const score = Object.assign(document.createElement("div"), { className: "score", textContent: hit.score.toFixed(3) });
      const bar = document.createElement("div");
      bar.className = "bar";
      bar.append(Object.assign(document.createElement("div"), { style: `width: ${Math.max(0, hit.score) * 100}%` }));
      const path = Object.assign(document.createElement("div"), { className: "path", textContent: hit.path });
      meta.append(score, bar, path);
      el.append(rank, meta);
      el.addEventListener("click", () => useGalleryItem(hit));
    }));
  }
  $("results-meta").textContent =
    `${result.results.length} results · ${result.method} · "${result.text}" · ${result.elapsed_ms.toFixed(0)} ms`;
}

async function search(event) {
  event.preventDefault();
  if (!state.reference) { setStatus("Choose a reference image first.", true); return; }
  const form = new FormData();
  if (state.reference.kind === "upload") form.append("image", state.reference.file);
  else form.append("gallery_id", String(state.reference.id));
  form.append("text", $("text").value);
  form.append("method", $("method").value);
  form.append("k", $("k").value);
  $("submit").disabled = true;
  setStatus("Searching…");
  try {
    const response = await fetch("/api/search", { method: "POST", body: form });
    if (!response.ok) { setStatus(await errorMessage(response), true); return; }
    const result = await response.json();
    renderResults(result);
    setStatus(`Done in ${result.elapsed_ms.toFixed(0)} ms.`);
  } catch (err) {
    setStatus(`Request failed: ${err}`, true);
  } finally {
    $("submit").disabled = false;
  }
}

$("upload").addEventListener("change", () => {
  const file = $("upload").files[0];
  if (!file) return;
  state.reference = { kind: "upload", file };
  showReference(URL.createObjectURL(file), `upload: ${file.name}`);
});
$("pick").addEventListener("click", async () => {
  $("gallery-dialog").showModal();
  if (!state.galleryOffset) await loadGalleryPage();
});
$("more-gallery").addEventListener("click", loadGalleryPage);
$("close-gallery").addEventListener("click", () => $("gallery-dialog").close());
$("search-form").addEventListener("submit", search);
loadInfo();
