package chaos

import (
	"bytes"
	"context"
	"encoding/json"

	toxiproxy "github.com/Shopify/toxiproxy/v2"
	"github.com/rs/zerolog"
)

// Proxy is a Toxiproxy proxy run in this process, without its HTTP API: a
// TCP listener on 127.0.0.1 that forwards to an upstream through a chain of
// toxics (reset_peer, slow_close, timeout, latency...). Build it with
// [NewProxy] and Close it.
type Proxy struct {
	p *toxiproxy.Proxy
}

// NewProxy starts a proxy on a free port of 127.0.0.1 in front of upstream
// (host:port).
func NewProxy(name, upstream string) (*Proxy, error) {
	server := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(nil), zerolog.Nop())
	p := toxiproxy.NewProxy(server, name, "127.0.0.1:0", upstream)
	if err := p.Start(); err != nil {
		return nil, err
	}
	return &Proxy{p: p}, nil
}

// Addr is the proxy's host:port.
func (p *Proxy) Addr() string {
	p.p.Lock()
	defer p.p.Unlock()
	return p.p.Listen
}

// URL is the proxy's base URL, for HTTP through it.
func (p *Proxy) URL() string { return "http://" + p.Addr() }

// Toxic is one toxic to add, as Toxiproxy's API spells it.
type Toxic struct {
	Name       string         `json:"name"`
	Type       string         `json:"type"`   // reset_peer, slow_close, timeout, latency...
	Stream     string         `json:"stream"` // "upstream" (client to server) or "downstream"
	Toxicity   float32        `json:"toxicity"`
	Attributes map[string]any `json:"attributes"`
}

// Add adds a toxic. Toxicity 0 means 1, every connection. A reset_peer
// toxic sets linger 0 only on connections made after it was added.
func (p *Proxy) Add(t Toxic) error {
	if t.Toxicity == 0 {
		t.Toxicity = 1
	}
	if t.Stream == "" {
		t.Stream = "downstream"
	}
	b, err := json.Marshal(t)
	if err != nil {
		return err
	}
	_, err = p.p.Toxics.AddToxicJson(bytes.NewReader(b))
	return err
}

// Remove removes the named toxic.
func (p *Proxy) Remove(name string) error {
	return p.p.Toxics.RemoveToxic(context.Background(), name)
}

// Reset removes every toxic.
func (p *Proxy) Reset() { p.p.Toxics.ResetToxics(context.Background()) }

// Close stops the proxy and closes its connections.
func (p *Proxy) Close() {
	p.p.Toxics.ResetToxics(context.Background())
	p.p.Stop()
}
