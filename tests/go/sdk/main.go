// Command sdk-conformance drives a spike Nexus with SPIKE's own Go SDK
// (github.com/spiffe/spike-sdk-go) and checks every answer, not just the
// absence of errors. It is a test peer of spike's suite (tests/sdk.rs runs it):
// the SDK takes its identity from the SPIFFE Workload API
// (SPIFFE_ENDPOINT_SOCKET) and finds Nexus through SPIKE_NEXUS_API_URL, as
// SPIKE's Pilot does.
//
// Modes, one identity each:
//
//	sdk-conformance superuser        secrets, policies and cipher, all checked
//	sdk-conformance recover          prints the recovery shards as JSON {"1":"hex",...}
//	sdk-conformance restore I HEX    sends one shard, prints the restoration status JSON
//
// Any mismatch prints "FAIL: ..." lines on stderr and exits 1.
package main

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"reflect"
	"sort"
	"strconv"
	"time"

	spike "github.com/spiffe/spike-sdk-go/api"
	"github.com/spiffe/spike-sdk-go/api/entity/data"
)

var failures int

func check(ok bool, format string, args ...any) {
	if !ok {
		failures++
		fmt.Fprintf(os.Stderr, "FAIL: "+format+"\n", args...)
	}
}

func must(err error, what string) {
	if err != nil {
		fmt.Fprintf(os.Stderr, "FAIL: %s: %v\n", what, err)
		os.Exit(1)
	}
}

// sdkErr turns the SDK's typed error pointer into an error (nil stays nil).
func sdkErr[T any](e *T) error {
	if e == nil {
		return nil
	}
	return fmt.Errorf("%v", any(e))
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: sdk-conformance superuser|recover|restore I HEX")
		os.Exit(2)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	api, err := spike.NewWithContext(ctx)
	must(sdkErr(err), "connect to the Workload API")
	defer api.Close()

	switch os.Args[1] {
	case "superuser":
		superuser(ctx, api)
	case "recover":
		shards, err := api.Recover(ctx)
		must(sdkErr(err), "Recover")
		out := map[string]string{}
		for i, s := range shards {
			check(s != nil, "Recover: shard %d is nil", i)
			if s != nil {
				out[strconv.Itoa(i)] = hex.EncodeToString(s[:])
			}
		}
		check(len(out) >= 2, "Recover: %d shards", len(out))
		must(json.NewEncoder(os.Stdout).Encode(out), "print shards")
	case "restore":
		if len(os.Args) != 4 {
			fmt.Fprintln(os.Stderr, "usage: sdk-conformance restore I HEX")
			os.Exit(2)
		}
		index, e := strconv.Atoi(os.Args[2])
		must(e, "shard index")
		raw, e := hex.DecodeString(os.Args[3])
		must(e, "shard hex")
		var shard [32]byte
		check(len(raw) == 32, "shard is %d bytes", len(raw))
		copy(shard[:], raw)
		status, err := api.Restore(ctx, index, &shard)
		must(sdkErr(err), "Restore")
		must(json.NewEncoder(os.Stdout).Encode(status), "print status")
	default:
		fmt.Fprintf(os.Stderr, "unknown mode %q\n", os.Args[1])
		os.Exit(2)
	}
	if failures > 0 {
		os.Exit(1)
	}
}

func superuser(ctx context.Context, api *spike.API) {
	// Secrets: put, get (current and by version), metadata, list.
	must(sdkErr(api.PutSecret(ctx, "sdk/db", map[string]string{"user": "admin", "pass": "one"})), "PutSecret v1")
	must(sdkErr(api.PutSecret(ctx, "sdk/db", map[string]string{"user": "admin", "pass": "two"})), "PutSecret v2")
	must(sdkErr(api.PutSecret(ctx, "sdk/other", map[string]string{"k": "v"})), "PutSecret other")
	s, err := api.GetSecret(ctx, "sdk/db")
	must(sdkErr(err), "GetSecret")
	check(s != nil && reflect.DeepEqual(s.Data, map[string]string{"user": "admin", "pass": "two"}), "GetSecret current: %+v", s)
	s, err = api.GetSecretVersion(ctx, "sdk/db", 1)
	must(sdkErr(err), "GetSecretVersion 1")
	check(s != nil && s.Data["pass"] == "one", "GetSecretVersion 1: %+v", s)
	meta, err := api.GetSecretMetadata(ctx, "sdk/db", 0)
	must(sdkErr(err), "GetSecretMetadata")
	check(meta != nil && meta.Metadata.CurrentVersion == 2, "metadata current version: %+v", meta)
	check(meta != nil && len(meta.Versions) == 2, "metadata versions: %+v", meta)
	keys, err := api.ListSecretKeys(ctx)
	must(sdkErr(err), "ListSecretKeys")
	if keys != nil {
		got := append([]string(nil), (*keys)...)
		sort.Strings(got)
		check(reflect.DeepEqual(got, []string{"sdk/db", "sdk/other"}), "ListSecretKeys: %v", got)
	} else {
		check(false, "ListSecretKeys returned nil")
	}

	// Delete and undelete, with and without a version list.
	must(sdkErr(api.DeleteSecretVersions(ctx, "sdk/db", []int{1})), "DeleteSecretVersions [1]")
	_, err = api.GetSecretVersion(ctx, "sdk/db", 1)
	check(err != nil, "a deleted version is still served")
	s, err = api.GetSecret(ctx, "sdk/db")
	check(err == nil && s != nil && s.Data["pass"] == "two", "current version after deleting v1: %+v %v", s, err)
	must(sdkErr(api.UndeleteSecret(ctx, "sdk/db", []int{1})), "UndeleteSecret [1]")
	s, err = api.GetSecretVersion(ctx, "sdk/db", 1)
	check(err == nil && s != nil && s.Data["pass"] == "one", "undeleted v1: %+v %v", s, err)
	// Deleting the current version makes the highest live one current (SPIKE's rule).
	must(sdkErr(api.DeleteSecret(ctx, "sdk/db")), "DeleteSecret (current)")
	s, err = api.GetSecret(ctx, "sdk/db")
	check(err == nil && s != nil && s.Data["pass"] == "one", "after deleting v2 the current version is v1: %+v %v", s, err)
	// Undelete with no list restores the current version: v1 is live, so nothing is
	// restored and SPIKE answers 404.
	check(api.UndeleteSecret(ctx, "sdk/db", []int{}) != nil, "undelete of a live current version succeeded")
	must(sdkErr(api.UndeleteSecret(ctx, "sdk/db", []int{2})), "UndeleteSecret [2]")
	s, err = api.GetSecret(ctx, "sdk/db")
	check(err == nil && s != nil && s.Data["pass"] == "two", "an undeleted higher version becomes current: %+v %v", s, err)
	// With every version deleted there is no current one: undelete with no list restores the
	// highest deleted version.
	must(sdkErr(api.DeleteSecretVersions(ctx, "sdk/db", []int{1, 2})), "DeleteSecretVersions [1 2]")
	_, err = api.GetSecret(ctx, "sdk/db")
	check(err != nil, "a secret with every version deleted is served")
	must(sdkErr(api.UndeleteSecret(ctx, "sdk/db", []int{})), "UndeleteSecret (no list, no current)")
	s, err = api.GetSecret(ctx, "sdk/db")
	check(err == nil && s != nil && s.Data["pass"] == "two", "undeleted highest version: %+v %v", s, err)
	_, err = api.GetSecret(ctx, "sdk/missing")
	check(err != nil, "a missing secret is served")

	// Policies: create, get, list (all and filtered), delete.
	perms := []data.PolicyPermission{data.PermissionRead, data.PermissionList}
	must(sdkErr(api.CreatePolicy(ctx, "sdk-web", "^spiffe://spike\\.ist/app/web$", "^sdk/.*$", perms)), "CreatePolicy")
	must(sdkErr(api.CreatePolicy(ctx, "sdk-api", "^spiffe://spike\\.ist/app/api$", "^api/.*$", []data.PolicyPermission{data.PermissionWrite})), "CreatePolicy 2")
	p, err := api.GetPolicy(ctx, "sdk-web")
	must(sdkErr(err), "GetPolicy")
	check(p != nil && p.Name == "sdk-web" && p.PathPattern == "^sdk/.*$" && p.SPIFFEIDPattern == "^spiffe://spike\\.ist/app/web$", "GetPolicy: %+v", p)
	check(p != nil && reflect.DeepEqual(p.Permissions, perms), "GetPolicy permissions: %+v", p)
	all, err := api.ListAllPolicies(ctx)
	must(sdkErr(err), "ListAllPolicies")
	check(all != nil && len(*all) == 2, "ListAllPolicies: %+v", all)
	if all != nil {
		for _, item := range *all {
			got, err := api.GetPolicy(ctx, item.ID)
			check(err == nil && got != nil && got.Name == item.Name, "GetPolicy by listed id %q: %+v %v", item.ID, got, err)
		}
	}
	filtered, err := api.ListPolicies(ctx, "", "^api/.*$")
	must(sdkErr(err), "ListPolicies by path")
	check(filtered != nil && len(*filtered) == 1 && (*filtered)[0].Name == "sdk-api", "ListPolicies by path: %+v", filtered)
	must(sdkErr(api.DeletePolicy(ctx, "sdk-api")), "DeletePolicy")
	_, err = api.GetPolicy(ctx, "sdk-api")
	check(err != nil, "a deleted policy is served")

	// Cipher: JSON and stream modes, round trips and a tampered ciphertext.
	plain := []byte("attack at dawn \x00\xff")
	ct, err := api.CipherEncrypt(ctx, plain, "")
	must(sdkErr(err), "CipherEncrypt")
	check(len(ct) > len(plain), "CipherEncrypt output too short: %d", len(ct))
	stream, err := api.CipherEncryptStream(ctx, bytes.NewReader(plain))
	must(sdkErr(err), "CipherEncryptStream")
	back, err := api.CipherDecryptStream(ctx, bytes.NewReader(stream))
	must(sdkErr(err), "CipherDecryptStream")
	check(bytes.Equal(back, plain), "stream round trip: %q", back)
	if len(stream) > 13 {
		version, nonce, body := stream[0], stream[1:13], stream[13:]
		back, err = api.CipherDecrypt(ctx, version, nonce, body, "")
		must(sdkErr(err), "CipherDecrypt (JSON) of a stream ciphertext")
		check(bytes.Equal(back, plain), "JSON round trip: %q", back)
		tampered := append([]byte(nil), body...)
		tampered[0] ^= 1
		_, err = api.CipherDecrypt(ctx, version, nonce, tampered, "")
		check(err != nil, "a tampered ciphertext decrypts")
	}
	fmt.Println(`{"superuser":"ok"}`)
}
