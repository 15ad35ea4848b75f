// Drives the real @bklit/sdk in headless Chromium for tests/test_browser.py.
//
//   node drive.mjs '{"scenario": "visit", "site": "http://127.0.0.1:PORT",
//                    "chromium": "PATH/OF/chromium", "profile": "NEW/EMPTY/DIR"}'
//
// Scenarios (the pages are under site/, served by the test with the SDK's
// dist/ folder at /sdk/ and the test's settings at /settings.mjs):
//
// - visit: in one tab, page1.html?utm_source=test (arriving from a search
//   engine), history.pushState to /pricing, trackEvent("cta-button", "click",
//   {position: "hero"}), a link click to page2.html (a full page load), then
//   the tab closes with its unload handlers run.
// - nokey: nokey.html (initBklit without apiKey) in one tab until the SDK has
//   received an error, then page1.html (with the key) in another tab as a
//   control, until its pageview is acknowledged.
// - sandboxed: sandboxed.html, whose <iframe sandbox="allow-scripts"> runs
//   the SDK in framed.html with an opaque origin (its WebSocket handshake
//   says "Origin: null"), until the frame's pageview is acknowledged.
//
// Every line printed on stdout is one JSON object with its wall-clock time in
// ms ("at"): "console" (the pages' console output, the SDK's debug log),
// "frame" (WebSocket frames as Chromium saw them), "page" (what a page reports
// about itself), "closed" (right after the tab closed), "done"; or "failed"
// with the error, and exit status 1.

import { WAIT_MS, emit, run } from "./chromium.mjs";

const options = JSON.parse(process.argv[2]);

// The console lines of every page, and waiting for them.
const logs = [];
const waiters = new Set();

function watch(page, tab) {
  page.on("console", (message) => {
    const text = message.text();
    logs.push({ tab, text });
    emit({ event: "console", tab, level: message.type(), text });
    for (const waiter of waiters) {
      waiter();
    }
  });
  page.on("pageerror", (error) => emit({ event: "console", tab, level: "pageerror", text: String(error) }));
  page.on("websocket", (socket) => {
    const url = socket.url();
    socket.on("framesent", (frame) => emit({ event: "frame", tab, url, direction: "sent", payload: frame.payload }));
    socket.on("framereceived", (frame) => emit({ event: "frame", tab, url, direction: "received", payload: frame.payload }));
    socket.on("close", () => emit({ event: "frame", tab, url, direction: "closed" }));
  });
}

// Resolve once `count` console lines of `tab` contain `text`; reject after WAIT_MS.
function logged(tab, text, count = 1) {
  const seen = () => logs.filter((line) => line.tab === tab && line.text.includes(text)).length >= count;
  return new Promise((resolve, reject) => {
    const waiter = () => {
      if (seen()) {
        waiters.delete(waiter);
        clearTimeout(timer);
        resolve();
      }
    };
    const timer = setTimeout(() => {
      waiters.delete(waiter);
      reject(new Error(`${tab}: no ${count}x console line containing ${JSON.stringify(text)} within ${WAIT_MS} ms`));
    }, WAIT_MS);
    waiters.add(waiter);
    waiter();
  });
}

// What the page (or frame) knows about itself, as the SDK reads it.
async function describe(page, tab, name) {
  const facts = await page.evaluate(() => ({
    url: location.href,
    origin: self.origin,
    referrer: document.referrer,
    userAgent: navigator.userAgent,
    language: navigator.language,
    viewport: { width: window.innerWidth, height: window.innerHeight },
    screen: { width: window.screen.width, height: window.screen.height },
    timezone: Intl.DateTimeFormat().resolvedOptions().timeZone,
    sessionId: JSON.parse(sessionStorage.getItem("bklit_session_id") || "null")?.id ?? null,
  }));
  emit({ event: "page", tab, name, ...facts });
}

async function visit(context) {
  const page = await context.newPage();
  watch(page, "tab");
  const ack = "Bklit SDK: Event acknowledged";

  await page.goto(`${options.site}/page1.html?utm_source=test`, { referer: "https://www.google.com/search?q=bklit" });
  await logged("tab", "Bklit SDK: Authentication successful");
  await logged("tab", `${ack} pageview`, 1);
  await describe(page, "tab", "page1");

  await page.evaluate(() => history.pushState({}, "", "/pricing"));
  await logged("tab", `${ack} pageview`, 2);
  await describe(page, "tab", "pushState");

  await page.evaluate(() => window.bklit.trackEvent("cta-button", "click", { position: "hero" }));
  await logged("tab", `${ack} event`, 1);

  await Promise.all([page.waitForURL(`${options.site}/page2.html`), page.click("#next")]);
  await logged("tab", "Bklit SDK: Authentication successful", 2);
  await logged("tab", `${ack} pageview`, 3);
  await describe(page, "tab", "page2");

  const closed = new Promise((resolve) => page.once("close", resolve));
  await page.close({ runBeforeUnload: true });
  await closed;
  emit({ event: "closed" });
}

async function nokey(context) {
  const unkeyed = await context.newPage();
  watch(unkeyed, "nokey");
  await unkeyed.goto(`${options.site}/nokey.html`);
  await logged("nokey", "Bklit SDK: Received message error");
  await logged("nokey", "Bklit SDK: WebSocket disconnected");
  await describe(unkeyed, "nokey", "nokey");

  const control = await context.newPage();
  watch(control, "control");
  await control.goto(`${options.site}/page1.html`);
  await logged("control", "Bklit SDK: Event acknowledged pageview");
  await describe(control, "control", "control");
}

async function sandboxed(context) {
  const page = await context.newPage();
  watch(page, "framed");
  await page.goto(`${options.site}/sandboxed.html`);
  await logged("framed", "Bklit SDK: Authentication successful");
  await logged("framed", "Bklit SDK: Event acknowledged pageview");
  await describe(page.frames().find((frame) => frame.url() === `${options.site}/framed.html`), "framed", "framed");
}

const scenarios = { visit, nokey, sandboxed };
// A normal browser's user agent instead of HeadlessChrome (which the
// server rightly drops as a bot); it applies to pages and the WebSocket.
await run(options, scenarios[options.scenario], options.userAgent ? { userAgent: options.userAgent } : {});
