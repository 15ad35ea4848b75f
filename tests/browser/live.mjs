// Drives the daemon's /live page in headless Chromium for tests/test_livepage.py, as a person would.
//
//   node live.mjs '{"site": "http://127.0.0.1:PORT", "chromium": "PATH", "profile": "NEW/EMPTY/DIR",
//                   "project": "p1", "key": "bk_...", "wrongKey": "bk_...", "screenshot": "PATH.png"}'
//
// 1. opens /live, types the project and a wrong key, presses Enter: the page must say the key
//    was refused and keep no key;
// 2. types the read key, presses Enter, waits until the page says "Live";
// 3. prints {"event": "waiting", "for": "pageview"} and waits for a line on standard input (the
//    test sends SDK traffic meanwhile), then until the live count, the sessions and the feed show it;
// 4. the same for "end" (the test closes the SDK socket): the count goes down, the feed says so;
// 5. the same for "screenshot" (the test plays demo traffic): switches the summary to 30 minutes,
//    saves a screenshot of the whole page.
//
// The scenario "crowd" waits for "crowd" (the test opens options.sessions SDK sockets), signs in,
// then watches the main thread's long tasks (over 50 ms) while the test sends pageviews on them
// ("browse"), and while they all close ("leave").
//
// The scenario "degraded" (a daemon whose ClickHouse does not answer) signs in with the read key,
// waits for "pageview" as above, and reports what the page says about the missing numbers.
//
// After each step it prints {"event": "page", "name": ..., facts}: what the page shows, read from
// the DOM. Every line is one JSON object, as drive.mjs prints them ("console" lines include CSP
// violations and uncaught errors); "done" at the end, or "failed" and exit status 1.

import { createInterface } from "node:readline";

import { WAIT_MS, emit, run } from "./chromium.mjs";

const options = JSON.parse(process.argv[2]);

const lines = createInterface({ input: process.stdin });
const queued = [];
const waiting = [];
lines.on("line", (line) => (waiting.length ? waiting.shift()(line) : queued.push(line)));

// Say what the test should do now, and wait until it says it did.
function ask(what) {
  emit({ event: "waiting", for: what });
  return new Promise((resolve) => (queued.length ? resolve(queued.shift()) : waiting.push(resolve)));
}

async function facts(page, name) {
  const seen = await page.evaluate(() => {
    const all = (selector) => [...document.querySelectorAll(selector)];
    const bars = all("#chart rect.bar").map((bar) => Number(bar.getAttribute("height")));
    return {
      url: location.href,
      status: document.querySelector("#connection").textContent,
      state: document.querySelector("#connection").dataset.state,
      signInShown: !document.querySelector("#sign-in").hidden,
      signInError: document.querySelector("#sign-in-error").hidden ? "" : document.querySelector("#sign-in-error").textContent,
      boardShown: !document.querySelector("#board").hidden,
      live: document.querySelector("#live-count").textContent,
      sessions: all("#sessions-body tr").map((row) => [...row.cells].map((cell) => cell.textContent)),
      sessionsNote: document.querySelector("#sessions-note").textContent,
      feed: all("#feed li").map((item) => item.textContent),
      bars: bars.length,
      barHeights: bars,
      chartLabel: document.querySelector("#chart desc") ? document.querySelector("#chart desc").textContent : "",
      figures: Object.fromEntries(all("#figures div").map((d) => [d.querySelector("dt").textContent, d.querySelector("dd").textContent])),
      topPages: all("#top-pages li").map((item) => item.textContent),
      summaryError: document.querySelector("#summary-error").hidden ? "" : document.querySelector("#summary-error").textContent,
      chartError: document.querySelector("#chart-error").hidden ? "" : document.querySelector("#chart-error").textContent,
      storedKey: sessionStorage.getItem("bklit.live.key"),
      storedProject: sessionStorage.getItem("bklit.live.project"),
      focused: document.activeElement ? document.activeElement.id : "",
    };
  });
  emit({ event: "page", name, ...seen });
  return seen;
}

async function signIn(page, project, key) {
  await page.fill("#project", project);
  await page.fill("#key", key);
  await page.press("#key", "Enter"); // the form works with Enter
}

async function open(context) {
  const page = await context.newPage();
  page.on("console", (message) => emit({ event: "console", tab: "live", level: message.type(), text: message.text() }));
  page.on("pageerror", (error) => emit({ event: "console", tab: "live", level: "pageerror", text: String(error) }));
  page.on("request", (request) => emit({ event: "request", url: request.url(), method: request.method(),
                                           authorization: Boolean(request.headers().authorization) }));

  await page.goto(`${options.site}/live`);
  await page.waitForSelector("#project:focus");
  await facts(page, "opened");
  return page;
}

// Signed in: the socket's snapshot, the stored pageviews per minute and the summary are in.
async function live(page) {
  await page.waitForSelector("#connection[data-state=live]");
  await page.waitForSelector("#chart-card:not([aria-busy])");
  await page.waitForSelector("#summary:not([aria-busy])");
  await page.waitForTimeout(300); // the redraw after the last answer
}

async function person(context) {
  const page = await open(context);
  await signIn(page, options.project, options.wrongKey);
  await page.waitForSelector("#sign-in-error:not([hidden])");
  await facts(page, "refused");

  await signIn(page, options.project, options.key);
  await live(page);
  await facts(page, "signed-in");

  await ask("pageview");
  await onePageview(page);
  await facts(page, "pageview");

  await ask("end");
  await page.waitForFunction(() => document.querySelector("#live-count").textContent === "0"
    && [...document.querySelectorAll("#feed li")].some((li) => li.textContent.includes("ended")));
  await facts(page, "ended");

  await ask("screenshot");
  await page.check("input[name=range][value='30m']");
  await page.waitForFunction(() => document.querySelector("#fig-pageviews").textContent !== "–"
    && document.querySelectorAll("#top-pages li:not(.empty)").length > 0, null, { timeout: WAIT_MS });
  await page.waitForTimeout(600); // the last redraw
  await facts(page, "busy");
  await page.screenshot({ path: options.screenshot, fullPage: true });
  emit({ event: "screenshot", path: options.screenshot });
}

function onePageview(page) {
  return page.waitForFunction(() => document.querySelector("#live-count").textContent === "1"
    && document.querySelectorAll("#sessions-body tr").length === 1
    && [...document.querySelectorAll("#feed li")].some((li) => li.textContent.includes("/pricing"))
    && [...document.querySelectorAll("#feed li")].some((li) => li.textContent.includes("cta-button")));
}

async function crowd(context) {
  const page = await open(context);
  await ask("crowd");
  await signIn(page, options.project, options.key);
  await live(page);
  await page.waitForFunction((n) => document.querySelector("#live-count").textContent === n.toLocaleString("en-GB"),
    options.sessions, { timeout: 60000 });
  await page.waitForTimeout(1000);
  await page.evaluate(() => {
    window.longTasks = [];
    new PerformanceObserver((list) => window.longTasks.push(...list.getEntries().map((e) => e.duration)))
      .observe({ type: "longtask", buffered: false });
  });
  await ask("browse");
  await page.waitForTimeout(1000);
  emit({ event: "longtasks", name: "crowd", durations: await page.evaluate(() => window.longTasks.splice(0)) });
  await facts(page, "crowd");
  await ask("leave");
  await page.waitForFunction(() => document.querySelector("#live-count").textContent === "0", null, { timeout: 60000 });
  emit({ event: "longtasks", name: "leave", durations: await page.evaluate(() => window.longTasks.splice(0)) });
  await facts(page, "left");
}

async function degraded(context) {
  const page = await open(context);
  await signIn(page, options.project, options.key);
  await live(page);
  await page.waitForSelector("#summary-error:not([hidden])");
  await page.waitForSelector("#chart-error:not([hidden])");
  await ask("pageview");
  await onePageview(page);
  await facts(page, "degraded");
}

await run(options, async (context) => {
  context.setDefaultTimeout(WAIT_MS);
  await { person, degraded, crowd }[options.scenario || "person"](context);
}, {
  viewport: options.viewport || { width: 1280, height: 900 },
  colorScheme: options.colorScheme || "light",
  timezoneId: options.timezone || "Europe/Berlin",
  locale: "en-GB",
}, () => lines.close());
