// The SHAPEPROF TensorBoard tab: an ES module TensorBoard loads in the tab's frame (plugin_entry.html, whose
// <base> is data/plugin/shapeprof/). Every file it loads comes from this plugin's routes: the view and its style
// from shapeprof, plotly.js from the installed plotly package. Nothing from the network.
function load(src) {
  return new Promise((resolve, reject) => {
    const script = document.createElement("script");
    script.src = src;
    script.onload = resolve;
    script.onerror = () => reject(new Error("cannot load " + src));
    document.head.appendChild(script);
  });
}

async function json(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: ${response.status} ${await response.text()}`);
  return response.json();
}

export async function render() {
  const style = document.createElement("link");
  style.rel = "stylesheet";
  style.href = "view.css";
  document.head.appendChild(style);
  await load("plotly.min.js");
  await load("view.js");
  const runs = await json("runs");
  window.shapeprofView.mount(document.body, runs, id => json("view?run=" + encodeURIComponent(id)));
}
