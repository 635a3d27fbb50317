// Package browser tests the admin endpoint's status page in a real
// headless Chromium, driven through the DevTools protocol by chromedp. It
// is a module of its own, so that chromedp never enters the module graph
// of the library's users; it holds tests only.
//
// The test needs the chromium binary (Debian's chromium package, which
// .ci/run installs). Without it the test skips, except in CI (CI=true),
// where it fails. Each run writes the page's screenshot to
// testdata/status-page.png, which git ignores; run
//
//	go test -run TestStatusPage -args -update-docs
//
// to copy it to docs/status-page.png, the screenshot of the README.
package browser
