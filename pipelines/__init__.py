"""The pipelines (installed as ``grace_kfp.pipelines``): they only wire components."""
