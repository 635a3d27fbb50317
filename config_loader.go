package resilience

// The loader behind LoadConfigWith: caarlos0/env, with every bad variable
// collected.

import (
	"errors"
	"fmt"
	"maps"
	"reflect"
	"slices"
	"strings"
	"time"

	"github.com/caarlos0/env/v11"
)

// loader parses variables with caarlos0/env and collects a VarError for each
// one that is bad, so that all are reported at once.
type loader struct {
	prefix  string
	environ map[string]string
	errs    []error
	bad     map[string]bool // variables already reported
}

var durationType = reflect.TypeOf(time.Duration(0))

func (l *loader) options(prefix string) env.Options {
	return env.Options{
		Environment: l.environ,
		Prefix:      l.prefix + prefix,
		FuncMap: map[reflect.Type]env.ParserFunc{
			durationType: func(s string) (any, error) { return ParseDuration(s) },
		},
	}
}

// parse fills the struct v from the variables named prefix + each field's
// env tag. A variable that does not parse leaves its field as it was and
// adds a VarError.
func (l *loader) parse(v any, prefix string) {
	err := env.ParseWithOptions(v, l.options(prefix))
	if err == nil {
		return
	}
	var agg env.AggregateError
	if !errors.As(err, &agg) {
		l.errs = append(l.errs, fmt.Errorf("resilience: reading %s*: %w", l.prefix+prefix, err))
		return
	}
	rt := reflect.TypeOf(v).Elem()
	for _, e := range agg.Errors {
		var pe env.ParseError
		if !errors.As(e, &pe) {
			l.errs = append(l.errs, fmt.Errorf("resilience: reading %s*: %w", l.prefix+prefix, e))
			continue
		}
		f, _ := rt.FieldByName(pe.Name)
		name := l.prefix + prefix + f.Tag.Get("env")
		l.report(name, reasonFor(pe.Type))
	}
}

// parseOne parses the single variable name into *d.
func (l *loader) parseOne(name string, d *time.Duration) {
	v := struct {
		D time.Duration `env:"X"`
	}{*d}
	full := l.prefix + name
	err := env.ParseWithOptions(&v, env.Options{
		Environment: map[string]string{"X": l.environ[full]},
		FuncMap:     l.options("").FuncMap,
	})
	if err != nil {
		l.report(full, reasonFor(durationType))
		return
	}
	*d = v.D
}

// check reports the variable name (without the loader's prefix) if it is
// set and ok is false. A default cannot be bad.
func (l *loader) check(name string, ok bool, why string) {
	full := l.prefix + name
	if _, set := l.environ[full]; ok || !set {
		return
	}
	l.report(full, why)
}

func (l *loader) report(name, why string) {
	if l.bad[name] {
		return
	}
	if l.bad == nil {
		l.bad = map[string]bool{}
	}
	l.bad[name] = true
	l.errs = append(l.errs, &VarError{Var: name, Value: l.environ[name], Reason: why})
}

// defaultFirst moves the reserved DEFAULT key to the front.
func defaultFirst(keys []string) []string {
	if i := slices.Index(keys, reservedKey); i > 0 {
		keys = slices.Insert(slices.Delete(keys, i, i+1), 0, reservedKey)
	}
	return keys
}

func reasonFor(t reflect.Type) string {
	switch {
	case t == durationType:
		return "not a duration: use seconds (60, 0.25) or a Go duration (1m, 1500ms)"
	case t.Kind() == reflect.Bool:
		return "not a boolean: use true or false"
	case t.Kind() == reflect.Float64:
		return "not a number"
	}
	return "not a whole number"
}

// names returns the keys K of the variables named prefix + K + one of the
// suffixes, sorted.
func (l *loader) names(prefix string, suffixes ...string) []string {
	full := l.prefix + prefix
	seen := map[string]bool{}
	for k := range l.environ {
		rest, ok := strings.CutPrefix(k, full)
		if !ok {
			continue
		}
		if len(suffixes) == 0 {
			if rest != "" && validKey(rest) {
				seen[rest] = true
			} else if rest != "" {
				l.report(k, "the name after "+full+" must be upper-case letters, digits and _, as EnvKey makes them")
			}
			continue
		}
		for _, s := range suffixes {
			if key, ok := strings.CutSuffix(rest, s); ok && key != "" {
				if validKey(key) {
					seen[key] = true
				} else {
					// It could never match a name's EnvKey: say so rather
					// than ignore it.
					l.report(k, "the name between "+full+" and "+s+" must be upper-case letters, digits and _, as EnvKey makes them")
				}
				break
			}
		}
	}
	return slices.Sorted(maps.Keys(seen))
}
