// The operator's browser meets a hostile page: headless Chromium (Debian's
// package) opens the console (and so holds its session cookie), then a page
// of another origin that auto-submits a form to the console's /requeue-all.
// Reports whether the browser held the cookie and how the console answered
// the forged post. Run by tests/it/browser.rs:
//   node cross_site.mjs <console url> <other origin's page url>
import { chromium } from 'playwright-core';

const [consoleUrl, evilUrl] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
try {
  const context = await browser.newContext();
  const page = await context.newPage();
  await page.goto(consoleUrl, { waitUntil: 'load' });
  const cookies = await context.cookies(consoleUrl);
  const hadCookie = cookies.some((c) => c.name === 'transfer_worker_session');
  const forged = page.waitForResponse((r) => r.url().endsWith('/requeue-all'));
  await page.goto(evilUrl);
  const response = await forged;
  console.log(JSON.stringify({ had_cookie: hadCookie, status: response.status(), text: (await response.text()).trim() }));
} finally {
  await browser.close();
}
