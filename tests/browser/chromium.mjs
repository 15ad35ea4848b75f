// What the browser drivers (drive.mjs, live.mjs) share: Debian's chromium, launched headless
// with a fresh profile, and their output, one JSON object a line with its wall-clock time in ms.

import { chromium } from "playwright-core";

export const WAIT_MS = 15000;
const ARGS = [
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
];

export function emit(record) {
  process.stdout.write(JSON.stringify({ ...record, at: Date.now() }) + "\n");
}

// Launch options.chromium on the empty profile folder options.profile (with `contextOptions`
// for playwright), run `scenario(context)`, print "done" or "failed", close, and exit 0 or 1.
export async function run(options, scenario, contextOptions = {}, cleanup = () => {}) {
  let context;
  let status = 0;
  try {
    context = await chromium.launchPersistentContext(options.profile, {
      executablePath: options.chromium,
      headless: true,
      args: ARGS,
      timeout: WAIT_MS,
      ...contextOptions,
    });
    await scenario(context);
    emit({ event: "done" });
  } catch (error) {
    emit({ event: "failed", message: String((error && error.stack) || error) });
    status = 1;
  } finally {
    cleanup();
    if (context) {
      await context.close().catch(() => {});
    }
  }
  process.exit(status);
}
