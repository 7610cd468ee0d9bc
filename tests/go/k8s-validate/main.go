// Command k8s-validate checks spike's Kubernetes manifests (packaging/kubernetes) against the
// Kubernetes API types with strict decoding: an unknown or misspelt field, a wrong type or an
// unknown kind fails. Strategic-merge patches are checked the same way once their `$patch`
// directives are set aside. It prints, as JSON, the environment variable names each spike
// container sets and the plain values it gives them ({"env":{"nexus":[...]},"values":{...}}),
// so the Rust test can compare them with what spike reads. Usage: k8s-validate DIR
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	"sigs.k8s.io/yaml"
)

// kustomization is the part of kustomize's file spike uses.
type kustomization struct {
	APIVersion string   `json:"apiVersion"`
	Kind       string   `json:"kind"`
	Resources  []string `json:"resources"`
	Patches    []struct {
		Path string `json:"path"`
	} `json:"patches"`
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "k8s-validate: "+format+"\n", args...)
	os.Exit(1)
}

// withoutDirectives drops strategic-merge `$patch` keys (and list items that are only a
// deletion marker), so a patch can be decoded strictly as the type it patches.
func withoutDirectives(v any) any {
	switch t := v.(type) {
	case map[string]any:
		out := map[string]any{}
		for k, x := range t {
			if strings.HasPrefix(k, "$") {
				continue
			}
			out[k] = withoutDirectives(x)
		}
		return out
	case []any:
		var out []any
		for _, x := range t {
			if m, ok := x.(map[string]any); ok && m["$patch"] == "delete" {
				continue
			}
			out = append(out, withoutDirectives(x))
		}
		return out
	}
	return v
}

func decode(file string, doc []byte, env map[string][]string, values map[string]string) {
	var meta struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
	}
	if err := yaml.Unmarshal(doc, &meta); err != nil {
		fail("%s: %v", file, err)
	}
	var obj any
	switch meta.APIVersion + "/" + meta.Kind {
	case "apps/v1/StatefulSet":
		obj = &appsv1.StatefulSet{}
	case "apps/v1/Deployment":
		obj = &appsv1.Deployment{}
	case "v1/Service":
		obj = &corev1.Service{}
	case "v1/ServiceAccount":
		obj = &corev1.ServiceAccount{}
	case "v1/Secret":
		obj = &corev1.Secret{}
	case "v1/Namespace":
		obj = &corev1.Namespace{}
	case "v1/ConfigMap":
		obj = &corev1.ConfigMap{}
	case "policy/v1/PodDisruptionBudget":
		obj = &policyv1.PodDisruptionBudget{}
	case "kustomize.config.k8s.io/v1beta1/Kustomization":
		var k kustomization
		if err := yaml.UnmarshalStrict(doc, &k); err != nil {
			fail("%s: %v", file, err)
		}
		dir := filepath.Dir(file)
		for _, r := range k.Resources {
			if _, err := os.Stat(filepath.Join(dir, r)); err != nil {
				fail("%s: resource %s: %v", file, r, err)
			}
		}
		for _, p := range k.Patches {
			if _, err := os.Stat(filepath.Join(dir, p.Path)); err != nil {
				fail("%s: patch %s: %v", file, p.Path, err)
			}
		}
		return
	default:
		fail("%s: unknown kind %s %s", file, meta.APIVersion, meta.Kind)
	}
	var generic any
	if err := yaml.Unmarshal(doc, &generic); err != nil {
		fail("%s: %v", file, err)
	}
	clean, err := yaml.Marshal(withoutDirectives(generic))
	if err != nil {
		fail("%s: %v", file, err)
	}
	if err := yaml.UnmarshalStrict(clean, obj); err != nil {
		fail("%s (%s): %v", file, meta.Kind, err)
	}
	// Only the base manifests say what spike runs with; patches change it.
	if strings.Contains(file, string(filepath.Separator)+"svid-files"+string(filepath.Separator)) {
		return
	}
	var spec *corev1.PodSpec
	switch o := obj.(type) {
	case *appsv1.StatefulSet:
		spec = &o.Spec.Template.Spec
	case *appsv1.Deployment:
		spec = &o.Spec.Template.Spec
	}
	if spec != nil {
		for _, c := range spec.Containers {
			for _, e := range c.Env {
				env[c.Name] = append(env[c.Name], e.Name)
				if e.Value != "" {
					values[c.Name+"/"+e.Name] = e.Value
				}
			}
		}
	}
	if s, ok := obj.(*appsv1.StatefulSet); ok && s.Spec.Replicas != nil {
		values["statefulset/"+s.Name+"/replicas"] = fmt.Sprint(*s.Spec.Replicas)
	}
}

func main() {
	if len(os.Args) != 2 {
		fail("usage: k8s-validate DIR")
	}
	env := map[string][]string{}
	values := map[string]string{}
	count := 0
	err := filepath.Walk(os.Args[1], func(path string, info os.FileInfo, err error) error {
		if err != nil || info.IsDir() || !strings.HasSuffix(path, ".yaml") {
			return err
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		for _, doc := range strings.Split(string(data), "\n---") {
			if strings.TrimSpace(doc) == "" {
				continue
			}
			decode(path, []byte(doc), env, values)
			count++
		}
		return nil
	})
	if err != nil {
		fail("%v", err)
	}
	if count == 0 {
		fail("no manifests under %s", os.Args[1])
	}
	for _, names := range env {
		sort.Strings(names)
	}
	out, _ := json.Marshal(map[string]any{"env": env, "values": values})
	fmt.Println(string(out))
}
