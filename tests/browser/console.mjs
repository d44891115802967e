// Drives the dead-event console as a person would: opens the page in
// headless Chromium (Debian's package, /usr/bin/chromium), takes a
// screenshot, clicks the first "Requeue" button, and reports what the page
// said. Run by tests/it/browser.rs:  node console.mjs <url> <screenshot.png>
import { chromium } from 'playwright-core';

const [url, screenshot] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  // The flags a sandboxed CI machine with no network needs.
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  await page.goto(url, { waitUntil: 'load' });
  await page.waitForSelector('table#dead');
  const dead = await page.locator('table#dead tr').count() - 1;
  const held = await page.locator('table#dead tr:nth-child(2) td:nth-child(7)').textContent();
  const heading = await page.textContent('h1');
  await page.screenshot({ path: screenshot, fullPage: true });
  await Promise.all([page.waitForNavigation(), page.locator('button.requeue').first().click()]);
  const flash = await page.textContent('#flash');
  console.log(JSON.stringify({ heading, dead, held: held.trim(), flash: flash.trim(), url: page.url() }));
} finally {
  await browser.close();
}
