// Command helm_render renders a Helm 3 chart the way `helm template` does, for tests on machines
// where the helm binary cannot be installed. It keeps Helm's semantics where charts rely on
// them: values read as JSON-typed YAML (numbers are float64) and coalesced over the chart's
// defaults (null deletes a default), one template set with sprig and Helm's own functions,
// missingkey=zero with "<no value>" erased, partials (_*) never emitted, NOTES.txt kept apart.
//
// Usage: helm_render [-f values.yaml]... [-name NAME] [-namespace NS] [-notes] CHART_DIR
//
// Output: every manifest as `---\n# Source: CHART/templates/FILE\nDOCUMENT` in file order, or
// with -notes the rendered NOTES.txt only. Build in GOPATH mode against Debian's packages:
// GO111MODULE=off GOPATH=<dir holding src/helm_render>:/usr/share/gocode go build.
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"text/template"

	"github.com/Masterminds/semver/v3"
	"github.com/Masterminds/sprig/v3"
	"sigs.k8s.io/yaml"
)

// Metadata is Chart.yaml, exposed to templates as .Chart with Helm's field names.
type Metadata struct {
	APIVersion  string            `json:"apiVersion"`
	Name        string            `json:"name"`
	Version     string            `json:"version"`
	AppVersion  string            `json:"appVersion,omitempty"`
	KubeVersion string            `json:"kubeVersion,omitempty"`
	Description string            `json:"description,omitempty"`
	Type        string            `json:"type,omitempty"`
	Keywords    []string          `json:"keywords,omitempty"`
	Home        string            `json:"home,omitempty"`
	Sources     []string          `json:"sources,omitempty"`
	Icon        string            `json:"icon,omitempty"`
	Deprecated  bool              `json:"deprecated,omitempty"`
	Annotations map[string]string `json:"annotations,omitempty"`
}

// KubeVersion is .Capabilities.KubeVersion.
type KubeVersion struct {
	Version string
	Major   string
	Minor   string
}

func (k KubeVersion) String() string     { return k.Version }
func (k KubeVersion) GitVersion() string { return k.Version }

// VersionSet is .Capabilities.APIVersions.
type VersionSet []string

// Has reports whether an apiVersion ("apps/v1") or apiVersion/Kind is available.
func (v VersionSet) Has(apiVersion string) bool {
	for _, known := range v {
		if known == apiVersion {
			return true
		}
	}
	return false
}

// Capabilities is .Capabilities.
type Capabilities struct {
	KubeVersion KubeVersion
	APIVersions VersionSet
}

// Files is .Files: the chart's files outside templates/ and the chart metadata.
type Files map[string][]byte

func (f Files) GetBytes(name string) []byte { return f[name] }
func (f Files) Get(name string) string      { return string(f[name]) }

// Lines splits a file into lines, as Helm's .Files.Lines.
func (f Files) Lines(name string) []string {
	if f[name] == nil {
		return []string{}
	}
	return strings.Split(string(f[name]), "\n")
}

type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }

// The bounds Helm puts on include recursion.
const recursionMax = 1000

// Helm's separator between documents of one template file.
var documentSep = regexp.MustCompile(`(?:^|\s*\n)---\s*`)

func main() {
	var valueFiles, apiVersions multiFlag
	flag.Var(&valueFiles, "f", "a values file, merged over the chart's values.yaml (repeatable; later wins)")
	flag.Var(&apiVersions, "api-versions", "an extra API version for .Capabilities.APIVersions (repeatable)")
	name := flag.String("name", "release-name", "release name")
	namespace := flag.String("namespace", "default", "release namespace")
	kubeVersion := flag.String("kube-version", "v1.31.0", "Kubernetes version for .Capabilities")
	notes := flag.Bool("notes", false, "print the rendered NOTES.txt instead of the manifests")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: helm_render [-f values.yaml]... [-name NAME] [-namespace NS] [-notes] CHART_DIR")
		os.Exit(2)
	}
	out, err := render(flag.Arg(0), valueFiles, *name, *namespace, *kubeVersion, apiVersions, *notes)
	if err != nil {
		fmt.Fprintln(os.Stderr, "Error:", err)
		os.Exit(1)
	}
	fmt.Print(out)
}

func render(chartDir string, valueFiles []string, name, namespace, kubeVersion string, extraAPIs []string,
	notes bool) (string, error) {
	meta, err := loadChart(chartDir)
	if err != nil {
		return "", err
	}
	defaults, err := readValues(filepath.Join(chartDir, "values.yaml"))
	if err != nil {
		return "", err
	}
	user := map[string]interface{}{}
	for _, file := range valueFiles {
		values, err := readValues(file)
		if err != nil {
			return "", err
		}
		user = mergeMaps(user, values)
	}
	values := coalesce(user, defaults)
	templates, files, err := readChartFiles(chartDir)
	if err != nil {
		return "", err
	}
	kube, err := semver.NewVersion(kubeVersion)
	if err != nil {
		return "", fmt.Errorf("-kube-version %q: %w", kubeVersion, err)
	}
	context := map[string]interface{}{
		"Values": values,
		"Release": map[string]interface{}{
			"Name": name, "Namespace": namespace, "IsInstall": true, "IsUpgrade": false, "Revision": 1,
			"Service": "Helm",
		},
		"Chart": meta,
		"Capabilities": &Capabilities{
			KubeVersion: KubeVersion{Version: "v" + kube.String(), Major: fmt.Sprint(kube.Major()),
				Minor: fmt.Sprint(kube.Minor())},
			APIVersions: append(VersionSet{"v1", "apps/v1", "batch/v1", "policy/v1", "networking.k8s.io/v1",
				"rbac.authorization.k8s.io/v1", "autoscaling/v2"}, extraAPIs...),
		},
		"Files":     files,
		"Subcharts": map[string]interface{}{},
	}
	rendered, err := execute(meta.Name, templates, context)
	if err != nil {
		return "", err
	}
	notesName := meta.Name + "/templates/NOTES.txt"
	if notes {
		return rendered[notesName], nil
	}
	var out strings.Builder
	for _, file := range sortedKeys(rendered) {
		if file == notesName {
			continue
		}
		for _, doc := range documentSep.Split("\n"+rendered[file], -1) {
			if doc = strings.TrimSpace(doc); doc != "" {
				fmt.Fprintf(&out, "---\n# Source: %s\n%s\n", file, doc)
			}
		}
	}
	return out.String(), nil
}

func loadChart(chartDir string) (*Metadata, error) {
	data, err := os.ReadFile(filepath.Join(chartDir, "Chart.yaml"))
	if err != nil {
		return nil, err
	}
	meta := &Metadata{}
	if err := yaml.Unmarshal(data, meta); err != nil {
		return nil, fmt.Errorf("Chart.yaml: %w", err)
	}
	if meta.APIVersion != "v2" || meta.Name == "" {
		return nil, errors.New("Chart.yaml: apiVersion must be v2 and name is required")
	}
	if _, err := semver.StrictNewVersion(meta.Version); err != nil {
		return nil, fmt.Errorf("Chart.yaml: version %q is not semver: %w", meta.Version, err)
	}
	return meta, nil
}

// readValues reads YAML as Helm does: through JSON, so every number is a float64.
func readValues(file string) (map[string]interface{}, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	values := map[string]interface{}{}
	if err := yaml.Unmarshal(data, &values); err != nil {
		return nil, fmt.Errorf("%s: %w", file, err)
	}
	return values, nil
}

// mergeMaps merges values files: maps deep, anything else replaced by the later file.
func mergeMaps(a, b map[string]interface{}) map[string]interface{} {
	out := make(map[string]interface{}, len(a))
	for k, v := range a {
		out[k] = v
	}
	for k, v := range b {
		if bm, ok := v.(map[string]interface{}); ok {
			if am, ok := out[k].(map[string]interface{}); ok {
				out[k] = mergeMaps(am, bm)
				continue
			}
		}
		out[k] = v
	}
	return out
}

// coalesce lays user values over the chart's defaults; a user null removes the default.
func coalesce(user, defaults map[string]interface{}) map[string]interface{} {
	for k, def := range defaults {
		value, given := user[k]
		switch {
		case !given:
			user[k] = def
		case value == nil:
			delete(user, k)
		default:
			um, uok := value.(map[string]interface{})
			dm, dok := def.(map[string]interface{})
			if uok && dok {
				user[k] = coalesce(um, dm)
			}
		}
	}
	for k, v := range user {
		if v == nil {
			delete(user, k)
		}
	}
	return user
}

// readChartFiles returns the templates (by name CHART/templates/...) and .Files.
func readChartFiles(chartDir string) (map[string]string, Files, error) {
	meta := map[string]bool{"Chart.yaml": true, "Chart.lock": true, "values.yaml": true, "values.schema.json": true,
		".helmignore": true}
	base := filepath.Base(filepath.Clean(chartDir))
	templates, files := map[string]string{}, Files{}
	err := filepath.WalkDir(chartDir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, err := filepath.Rel(chartDir, p)
		if err != nil {
			return err
		}
		rel = filepath.ToSlash(rel)
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		switch {
		case strings.HasPrefix(rel, "templates/"):
			templates[path.Join(base, rel)] = string(data)
		case strings.HasPrefix(rel, "charts/"):
			return fmt.Errorf("%s: subcharts are not supported", rel)
		case !meta[rel]:
			files[rel] = data
		}
		return nil
	})
	return templates, files, err
}

func sortedKeys(m map[string]string) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// execute parses every template into one set (so `define`s are shared) and runs each non-partial.
func execute(chartName string, templates map[string]string, context map[string]interface{}) (map[string]string, error) {
	t := template.New("gotpl").Option("missingkey=zero")
	included := map[string]int{}
	t.Funcs(funcMap(t, included))
	for _, name := range sortedKeys(templates) {
		if _, err := t.New(name).Parse(templates[name]); err != nil {
			return nil, err
		}
	}
	rendered := map[string]string{}
	for _, name := range sortedKeys(templates) {
		if strings.HasPrefix(path.Base(name), "_") {
			continue
		}
		context["Template"] = map[string]interface{}{"Name": name, "BasePath": chartName + "/templates"}
		var buf strings.Builder
		if err := t.ExecuteTemplate(&buf, name, context); err != nil {
			return nil, err
		}
		rendered[name] = strings.ReplaceAll(buf.String(), "<no value>", "")
	}
	return rendered, nil
}

// funcMap is sprig (without env and expandenv) plus Helm's functions, include and tpl bound to t.
func funcMap(t *template.Template, included map[string]int) template.FuncMap {
	f := sprig.TxtFuncMap()
	delete(f, "env")
	delete(f, "expandenv")
	f["toYaml"] = func(v interface{}) string {
		data, err := yaml.Marshal(v)
		if err != nil {
			return ""
		}
		return strings.TrimSuffix(string(data), "\n")
	}
	f["fromYaml"] = func(s string) map[string]interface{} {
		m := map[string]interface{}{}
		if err := yaml.Unmarshal([]byte(s), &m); err != nil {
			m["Error"] = err.Error()
		}
		return m
	}
	f["toJson"] = func(v interface{}) string {
		data, err := json.Marshal(v)
		if err != nil {
			return ""
		}
		return string(data)
	}
	f["fromJson"] = func(s string) map[string]interface{} {
		m := map[string]interface{}{}
		if err := json.Unmarshal([]byte(s), &m); err != nil {
			m["Error"] = err.Error()
		}
		return m
	}
	f["required"] = func(message string, value interface{}) (interface{}, error) {
		if s, ok := value.(string); value == nil || (ok && s == "") {
			return value, errors.New(message)
		}
		return value, nil
	}
	f["fail"] = func(message string) (string, error) { return "", errors.New(message) }
	f["lookup"] = func(string, string, string, string) (map[string]interface{}, error) {
		return map[string]interface{}{}, nil
	}
	f["include"] = func(name string, data interface{}) (string, error) {
		if included[name] > recursionMax {
			return "", fmt.Errorf("rendering template has a nested reference name: %s", name)
		}
		included[name]++
		defer func() { included[name]-- }()
		var buf strings.Builder
		err := t.ExecuteTemplate(&buf, name, data)
		return buf.String(), err
	}
	f["tpl"] = func(text string, context map[string]interface{}) (string, error) {
		clone, err := t.Clone()
		if err != nil {
			return "", err
		}
		clone.Funcs(funcMap(clone, included))
		current, _ := context["Template"].(map[string]interface{})
		name, _ := current["Name"].(string)
		parsed, err := clone.New(name).Parse(text)
		if err != nil {
			return "", err
		}
		var buf strings.Builder
		if err := parsed.Execute(&buf, context); err != nil {
			return "", err
		}
		return strings.ReplaceAll(buf.String(), "<no value>", ""), nil
	}
	return f
}
