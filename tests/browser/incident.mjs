// Drives the console through an incident as an operator would, in headless
// Chromium (Debian's package): one step per run, so the test can check the
// database between steps. Run by tests/it/browser.rs:
//   node incident.mjs <console url> pause <reason> <screenshot.png>
//     types the reason, clicks "Pause apply"; reports the banner
//   node incident.mjs <console url> transfer <id or key> <screenshot.png>
//     looks the transfer up from the console's form, reports what its page
//     shows, clicks "Replay", reports the notice
//   node incident.mjs <console url> resume - <screenshot.png>
//     clicks "Resume" in the banner; reports whether a banner is left
// Prints one JSON object.
import { chromium } from 'playwright-core';

const [url, step, arg, screenshot] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const text = async (page, selector) =>
  (await page.locator(selector).count()) ? (await page.textContent(selector)).trim().replace(/\s+/g, ' ') : null;
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  await page.goto(url, { waitUntil: 'load' });
  const out = { step };
  if (step === 'pause') {
    out.banner_before = await text(page, '#paused');
    out.charts = await page.locator('#chart svg').count();
    await page.fill('#pause input[name=reason]', arg);
    await Promise.all([page.waitForNavigation(), page.click('#pause-apply')]);
    out.flash = await text(page, '#flash');
    out.banner = await text(page, '#paused');
    out.reason = await text(page, '#pause-reason');
    out.resume_button = await text(page, '#resume');
    await page.screenshot({ path: screenshot, fullPage: true });
  } else if (step === 'transfer') {
    await page.fill('#lookup input[name=q]', arg);
    await Promise.all([page.waitForNavigation(), page.click('#lookup button')]);
    out.url = page.url();
    out.heading = await text(page, 'h1');
    out.status = await text(page, '#status');
    out.events = (await page.locator('#events tr').count()) - 1;
    out.publications = await page.locator('#events li').count();
    await Promise.all([page.waitForNavigation(), page.click('#replay button')]);
    out.flash = await text(page, '#flash');
    await page.screenshot({ path: screenshot, fullPage: true });
  } else if (step === 'resume') {
    await Promise.all([page.waitForNavigation(), page.click('#resume')]);
    out.flash = await text(page, '#flash');
    out.banner = await text(page, '#paused');
    await page.screenshot({ path: screenshot, fullPage: true });
  } else {
    throw new Error(`unknown step ${step}`);
  }
  console.log(JSON.stringify(out));
} finally {
  await browser.close();
}
